"""DC-Solver in ComfyUI: search ratios on a tiny model, reuse the file, sample, refuse another model."""
import time

import pytest
import torch


def _search(comfyui, model, name="dc_test", overwrite=True, **kw):
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    args = dict(model=model, positive=tiny.conditioning("sd15", 1), negative=tiny.conditioning("sd15", 2),
                latent_image={"samples": torch.zeros(4, 4, 8, 8)}, scheduler="karras", steps="5,6", cfgs="3,4,6",
                iterations=4, seed=0, name=name, overwrite=overwrite)
    args.update(kw)
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDCSolverSearch"]().search(**args)[0]


def _sample(comfyui, model, record, steps, cfg=4.0):
    import comfy.samplers

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    sampler = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDCSolverSampler"]().get_sampler(2, "bh2", record)[0]
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)
    return comfy.samplers.sample(model, noise, tiny.conditioning("sd15", 1, 2), tiny.conditioning("sd15", 2, 2), cfg,
                                 model.load_device, sampler, sig, model_options=model.model_options,
                                 latent_image=latent, seed=1)


def test_search_save_reuse_sample_and_refuse(comfyui, models_dir):
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build("sd15")
    t = time.time()
    record = _search(comfyui, model)
    assert time.time() - t < 60
    assert set(record.searched) == {(n, c) for n in (5, 6) for c in (3.0, 4.0, 6.0)}
    assert all(r[:2] == [1.0, 1.0] for r in record.searched.values())
    assert (models_dir / "dc_solver" / "dc_test.safetensors").is_file()
    again = _search(comfyui, model, overwrite=False)
    assert again.searched == record.searched and torch.equal(again.cpr, record.cpr)
    assert record.ratios(5, 4.0) == record.searched[(5, 4.0)]           # searched setting: searched ratios
    assert len(record.ratios(8, 5.0)) == 8                               # unseen: the regression's
    for steps in (5, 8):
        assert torch.isfinite(_sample(comfyui, model, record, steps)).all()
    plain = _sample(comfyui, model, None, 5)
    assert not torch.equal(plain, _sample(comfyui, model, record, 5))    # the ratios are used
    with pytest.raises(ValueError, match="another model or schedule"):
        _sample(comfyui, tiny.build("sd15", seed=3), record, 5)
    with pytest.raises(ValueError, match="steps"):
        _search(comfyui, model, steps="5,x")
