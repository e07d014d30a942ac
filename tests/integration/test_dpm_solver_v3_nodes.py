"""DPM-Solver-v3 in ComfyUI: calibrate once on a tiny model, sample, and refuse what does not fit."""
import time

import pytest
import torch

from prompts import custom_advanced


def _calibrate(comfyui, arch="sd15", name="tiny_test", overwrite=True, cfg=4.0, **kw):
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build(arch)
    latent = {"samples": torch.zeros(8, 4, 8, 8)}
    args = dict(model=model, positive=tiny.conditioning(arch, 1), negative=tiny.conditioning(arch, 2),
                latent_image=latent, cfg=cfg, samples=16, grid_points=16, data_steps=8,
                statistics="per channel (any resolution)", seed=0, name=name, overwrite=overwrite)
    args.update(kw)
    return model, nodes["TrainFreeDPMSolverV3Calibrate"]().calibrate(**args)[0]


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_calibration_is_quick_saved_and_reused(comfyui, models_dir, arch):
    t = time.time()
    model, record = _calibrate(comfyui, arch)
    assert time.time() - t < 60
    path = models_dir / "dpm_solver_v3" / "tiny_test.safetensors"
    assert path.is_file() and record.ems.l.shape[1:] == (16 if arch == "flux" else 4, 1, 1)
    assert torch.isfinite(record.ems.s).all() and torch.isfinite(record.ems.b).all()
    again = _calibrate(comfyui, arch, overwrite=False)[1]          # loads, does not recompute
    assert torch.equal(again.ems.l, record.ems.l)
    loaded = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMSolverV3Load"]().load("tiny_test.safetensors")[0]
    assert loaded.keys == record.keys


def _sample(comfyui, model, record, steps=6, arch="sd15"):
    import comfy.sample
    import comfy.samplers

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    sampler = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMSolverV3Sampler"]().get_sampler(2, False, "full", True,
                                                                                            ems=record)[0]
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(2, 4, 8, 8))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return comfy.samplers.sample(model, noise, tiny.conditioning(arch, 1, 2), tiny.conditioning(arch, 2, 2), 4.0,
                                 model.load_device, sampler, sig, model_options=model.model_options,
                                 latent_image=latent, seed=1)


def test_statistics_from_another_model_are_refused(comfyui, models_dir):
    model, record = _calibrate(comfyui, "sd15")
    out = _sample(comfyui, model, record)
    assert torch.isfinite(out).all()
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    other = tiny.build("sd15", seed=1)
    with pytest.raises(ValueError, match="another model or schedule.*model: calibrated for"):
        _sample(comfyui, other, record)
    lora = model.clone()
    key = next(k for k in model.model_state_dict() if k.endswith("attn2.to_q.weight"))
    lora.add_patches({key: (torch.full_like(model.model_state_dict()[key], 0.05),)}, 1.0)
    with pytest.raises(ValueError, match="another model"):
        _sample(comfyui, lora, record)


def test_bad_names_truncated_files_and_interruption(comfyui, models_dir):
    with pytest.raises(ValueError, match="invalid calibration name"):
        _calibrate(comfyui, name="../escape")
    _calibrate(comfyui, name="trunc")
    path = models_dir / "dpm_solver_v3" / "trunc.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable"):
        _calibrate(comfyui, name="trunc", overwrite=False)
    _calibrate(comfyui, name="cfg4")
    with pytest.raises(ValueError, match="another name, or set overwrite"):
        _calibrate(comfyui, name="cfg4", overwrite=False, cfg=6.0)
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        _calibrate(comfyui, name="interrupted")
    assert not list((models_dir / "dpm_solver_v3").glob("interrupted*")) and \
        not list((models_dir / "dpm_solver_v3").glob(".interrupted*"))


def test_calibrate_then_sample_through_the_executor(comfyui, models_dir):
    prompt = custom_advanced("TrainFreeDPMSolverV3Sampler", {"order": 2, "pseudo_order": False, "corrector": "half",
                                                             "lower_order_final": True}, steps=5)
    prompt["cal"] = {"class_type": "TrainFreeDPMSolverV3Calibrate", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "cfg": 4.0, "samples": 8, "grid_points": 12, "data_steps": 6, "statistics": "per channel (any resolution)",
        "seed": 0, "name": "executor_test", "overwrite": True}}
    prompt["sampler"]["inputs"]["ems"] = ["cal", 0]
    ok, out, err = comfyui.run(prompt)
    assert ok, err
    assert "finite=True" in out["stats"]["text"][0]
