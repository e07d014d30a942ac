"""Calibrations are reused only for the settings they were made with, and sampling with other settings
(CFG, sampler, scheduler, step counts outside the searched grid) says so in the log instead of failing silently."""
import logging

import pytest
import torch

import test_cache_quant_nodes as cq
import test_dc_solver_nodes as dc
import test_dpm_solver_v3_nodes as v3
import test_linear_ag_nodes as lag
import test_schedule_search_node as ss

OTHER = "another name, or set overwrite"


def _warnings(caplog):
    return " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_changed_quality_settings_are_not_silently_reused(comfyui, models_dir, caplog):
    import comfy.samplers

    caplog.set_level(logging.INFO, logger="trainfree")
    model, _ = v3._calibrate(comfyui, "sd15", name="q")
    v3._calibrate(comfyui, "sd15", name="q", overwrite=False)
    assert "reusing q.safetensors" in caplog.text
    with pytest.raises(ValueError, match=f"settings: .*samples=16.*samples=32.*{OTHER}"):
        v3._calibrate(comfyui, "sd15", name="q", overwrite=False, samples=32)
    with pytest.raises(ValueError, match=OTHER):
        v3._calibrate(comfyui, "sd15", name="q", overwrite=False, seed=1)
    dc._search(comfyui, model, name="d")
    with pytest.raises(ValueError, match=f"iterations=4.*iterations=6.*{OTHER}"):
        dc._search(comfyui, model, name="d", overwrite=False, iterations=6)
    euler = comfy.samplers.sampler_object("euler")
    ss._search(comfyui, model, euler, name="s")
    with pytest.raises(ValueError, match=f"budget=12.*budget=20.*{OTHER}"):
        ss._search(comfyui, model, euler, name="s", overwrite=False, budget=20)
    lag._calibrate(comfyui, model, name="l")
    with pytest.raises(ValueError, match=f"latent=4x4x8x8.*latent=2x4x8x8.*{OTHER}"):
        lag._calibrate(comfyui, model, name="l", overwrite=False, batch=2)


def test_schedule_search_tells_the_packs_dropdown_samplers_apart(comfyui):
    import comfy.samplers

    key = comfyui.module_of("TrainFreeScheduleSearch")._sampler_key
    ours = [n for n in comfy.samplers.SAMPLER_NAMES if n.startswith("trainfree_")]
    assert len(ours) >= 3
    keys = {key(comfy.samplers.sampler_object(n)) for n in ours}
    assert len(keys) == len(ours)
    assert all(n in k for n, k in zip(ours, [key(comfy.samplers.sampler_object(n)) for n in ours]))


def test_dc_solver_clamps_and_warns_outside_the_searched_grid(comfyui, models_dir, caplog):
    model = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15")
    record = dc._search(comfyui, model)                               # steps 5, 6; CFG 3-6; karras
    assert all(0.5 <= r <= 1.5 for r in record.ratios(30, 12.0))
    caplog.clear()
    dc._sample(comfyui, model, record, 5)
    assert _warnings(caplog) == ""                                    # a searched setting: nothing to say
    dc._sample(comfyui, model, record, 9)
    assert "searched for steps 5-6 and CFG 3-6; 9 steps at CFG 4 is extrapolated" in _warnings(caplog)
    caplog.clear()
    import comfy.samplers

    sampler = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDCSolverSampler"]().get_sampler(2, "bh2", record)[0]
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 5)
    comfy.samplers.sample(model, torch.randn(1, 4, 8, 8), tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2),
                          4.0, model.load_device, sampler, sig, latent_image=torch.zeros(1, 4, 8, 8), seed=1)
    assert "calibrated for the 'karras' scheduler's sigmas; these sigmas differ" in _warnings(caplog)


def test_other_cfg_or_sampler_than_calibrated_is_logged(comfyui, models_dir, caplog):
    model, record = v3._calibrate(comfyui, "sd15")                    # CFG 4
    caplog.clear()
    v3._sample(comfyui, model, record)
    assert _warnings(caplog) == ""
    import comfy.samplers

    sampler = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMSolverV3Sampler"]().get_sampler(2, False, "full", True,
                                                                                            ems=record)[0]
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)
    comfy.samplers.sample(model, torch.randn(1, 4, 8, 8), tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2),
                          7.0, model.load_device, sampler, sig, latent_image=torch.zeros(1, 4, 8, 8), seed=1)
    assert "calibrated for CFG 4; this run uses 7" in _warnings(caplog)
    caplog.clear()
    rec = lag._calibrate(comfyui, model)                              # euler, normal, CFG 4
    lag._sample(comfyui, lag._patch(comfyui, model, rec), sampler="heun")
    assert "calibrated with the 'euler' sampler; this run uses another one (sample_heun)" in _warnings(caplog)
    flux = tiny.build("flux")
    sch = cq._calibrate(comfyui, flux, "flux", steps=8, cfg=3.0)
    caplog.clear()
    cq._sample(comfyui, cq._cache(comfyui, flux, "flux", schedule=sch), "flux", cfg=3.0)
    assert _warnings(caplog) == ""
    cq._sample(comfyui, cq._cache(comfyui, flux, "flux", schedule=sch), "flux", cfg=5.0)
    assert "calibrated for CFG 3; this run uses 5" in _warnings(caplog)


def test_cfg_one_is_refused_for_linear_ag_calibration_and_reported_when_sampling(comfyui, models_dir, caplog):
    caplog.set_level(logging.INFO, logger="trainfree")
    base = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15")
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    with pytest.raises(ValueError, match="at CFG 1 ComfyUI skips that pass"):
        comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeLinearAGCalibrate"]().calibrate(
            base, tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2), {"samples": torch.zeros(2, 4, 8, 8)},
            8, 1.0, "euler", "normal", 1, 0, "cfg1", True)
    assert not (models_dir / "linear_ag" / "cfg1.safetensors").exists()
    rec = lag._calibrate(comfyui, base)
    lag._sample(comfyui, lag._patch(comfyui, base, rec), cfg=1.0)
    assert "LinearAG inactive" in caplog.text
    ag = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]().patch(base, 0.5)[0]
    lag._sample(comfyui, ag, cfg=1.0)
    assert "Adaptive Guidance inactive" in caplog.text


def test_files_from_before_settings_were_recorded_are_reused_and_old_steep_statistics_are_capped(
        comfyui, models_dir, caplog):
    import sys

    caplog.set_level(logging.INFO, logger="trainfree")
    calibration = sys.modules[comfyui.pack().__name__ + ".calibration"]
    v3._calibrate(comfyui, "sd15", name="legacy")
    path = models_dir / "dpm_solver_v3" / "legacy.safetensors"
    keys = {k: v for k, v in calibration.stored_keys(path).items() if k != "settings"}
    tensors = calibration.load(path, "dpm_solver_v3", keys)
    tensors["s"] = tensors["s"] + 3.0                              # steep, as files from before the cap could be
    calibration.save(path, tensors, "dpm_solver_v3", keys)
    caplog.clear()
    v3._calibrate(comfyui, "sd15", name="legacy", overwrite=False)
    assert "reusing legacy.safetensors, made before calibration settings were recorded" in caplog.text
    assert "the slope s was bounded to [-8, 0.5]" in _warnings(caplog)
    loaded = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMSolverV3Load"]().load("legacy.safetensors")[0]
    assert float(loaded.ems.s.max()) <= 0.5


def test_sigma_check_knows_how_ksampler_and_basic_scheduler_build_sigmas(comfyui):
    import sys

    import comfy.samplers

    sup = sys.modules[comfyui.pack().__name__ + ".nodes.calibration_support"]
    ms = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15").get_model_object("model_sampling")
    for sampler, scheduler in (("uni_pc", "karras"), ("dpm_2", "simple"), ("euler", "ddim_uniform"),
                               ("euler", "normal")):
        assert sup._sigmas_note(ms, scheduler, sup.scheduler_sigmas(ms, scheduler, 6, sampler), sampler) is None
    assert sup._sigmas_note(ms, "ddim_uniform", sup.basic_scheduler_sigmas(ms, "ddim_uniform", 6), "euler") is None
    assert len(comfy.samplers.calculate_sigmas(ms, "ddim_uniform", 6)) != 7      # the case that needs trimming
    plain = comfy.samplers.calculate_sigmas(ms, "karras", 6)                      # BasicScheduler, no drop
    assert "penultimate" in sup._sigmas_note(ms, "karras", plain, "uni_pc")
    assert "another scheduler" in sup._sigmas_note(ms, "karras", comfy.samplers.calculate_sigmas(ms, "normal", 6),
                                                   "euler")
    assert "another scheduler" in sup._sigmas_note(ms, "karras", plain[:1], "euler")   # one value: no crash
    sup.warn_if_other_run("x", {"scheduler": "simple"}, object(), sigmas=plain[:1])
    sup.warn_if_other_run("x", {"scheduler": "simple"}, object(), sigmas=plain)   # no model_patcher: logs, no raise


def test_dc_search_uses_the_sigmas_basic_scheduler_gives(comfyui, models_dir):
    model = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15")
    record = dc._search(comfyui, model, scheduler="ddim_uniform", steps="5,6", cfgs="4")
    assert {n: len(r) for (n, _), r in record.searched.items()} == {5: 5, 6: 6}


def test_linear_ag_calibrates_cfg_pp_samplers_at_cfg_one(comfyui, models_dir):
    base = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15")
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    rec = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeLinearAGCalibrate"]().calibrate(
        base, tiny.conditioning("sd15", 1, 4), tiny.conditioning("sd15", 2), {"samples": torch.zeros(4, 4, 8, 8)},
        8, 1.0, "euler_cfg_pp", "normal", 1, 0, "pp", True)[0]
    assert rec.coef[1:].isfinite().all()


def test_ddim_uniform_calibrations_fit_the_steps_ksampler_really_runs(comfyui, models_dir, caplog):
    """KSampler's ddim_uniform runs more steps than asked (7 for 6 on these models): the calibrations are
    made for the steps it really runs, so sampling with the same KSampler settings is accepted."""
    import comfy.sample

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    flux = tiny.build("flux")
    head, tail = cq.SPANS["flux"]
    sch = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeCacheQuantCalibrate"]().calibrate(
        flux, tiny.conditioning("flux", 1), tiny.conditioning("flux", 2), {"samples": torch.zeros(1, 4, 8, 8)}, 0,
        6, 3.0, "euler", "ddim_uniform", 3, head, tail, True, "ddim", True)[0]
    runs = len(sch.full)
    assert runs != 6
    latent = comfy.sample.fix_empty_latent_channels(flux, torch.zeros(1, 4, 8, 8))
    caplog.clear()
    out = comfy.sample.sample(cq._cache(comfyui, flux, "flux", schedule=sch), torch.randn(latent.shape), 6, 3.0,
                              "euler", "ddim_uniform", tiny.conditioning("flux", 1), tiny.conditioning("flux", 2),
                              latent, seed=1, disable_pbar=True)
    assert torch.isfinite(out).all() and _warnings(caplog) == ""
    base = tiny.build("sd15")
    rec = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeLinearAGCalibrate"]().calibrate(
        base, tiny.conditioning("sd15", 1, 2), tiny.conditioning("sd15", 2), {"samples": torch.zeros(2, 4, 8, 8)},
        6, 4.0, "euler", "ddim_uniform", 1, 0, "lddim", True)[0]
    assert rec.steps == len(rec.sigmas) - 1 != 6
    model = lag._patch(comfyui, base, rec)
    out = comfy.sample.sample(model, torch.randn(2, 4, 8, 8), 6, 4.0, "euler", "ddim_uniform",
                              tiny.conditioning("sd15", 3, 2), tiny.conditioning("sd15", 4, 2), torch.zeros(2, 4, 8, 8),
                              seed=4, disable_pbar=True)
    assert torch.isfinite(out).all()


def test_schedule_search_runs_uni_pc_and_keys_samplers_by_content(comfyui, models_dir, caplog):
    """uni_pc / sa_solver got the search's float64 sigmas and failed deep in torch; a sampler carrying
    calibration data was keyed by a memory address, so its cached schedule was never found again."""
    import comfy.samplers

    model = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15")
    for name in ("uni_pc", "uni_pc_bh2", "sa_solver"):
        sig = ss._search(comfyui, model, comfy.samplers.sampler_object(name), budget=3, name="u_" + name)
        assert sig.dtype == torch.float32 and bool((sig[:-1] > sig[1:]).all())
    key = comfyui.module_of("TrainFreeScheduleSearch")._sampler_key
    _, record = v3._calibrate(comfyui, "sd15", name="keyed")
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMSolverV3Sampler"]()
    loaded = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMSolverV3Load"]().load("keyed.safetensors")[0]
    a = key(node.get_sampler(2, False, "full", True, ems=record)[0])
    b = key(node.get_sampler(2, False, "full", True, ems=loaded)[0])
    assert a == b and "0x" not in a and a.startswith("trainfree.nodes.dpm_solver_v3.")
    assert a != key(node.get_sampler(3, False, "full", True, ems=loaded)[0])
    caplog.clear()
    ss._search(comfyui, model, comfy.samplers.sampler_object("euler_ancestral"), budget=2, name="anc")
    assert "stochastic sampler (sample_euler_ancestral)" in _warnings(caplog)


def test_searches_stop_at_cancel_before_their_long_reference_solves(comfyui, models_dir):
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    model = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15").clone()
    calls = []
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "count", lambda ex, *a, **k: (calls.append(1), ex(*a, **k))[1])
    for search in (lambda: dc._search(comfyui, model, name="cancel"),
                   lambda: ss._search(comfyui, model, comfy_sampler("euler"), name="cancel")):
        calls.clear()
        mm.interrupt_current_processing(True)
        with pytest.raises(mm.InterruptProcessingException):
            search()
        mm.interrupt_current_processing(False)
        assert len(calls) <= 1, len(calls)
    assert not list(models_dir.rglob("cancel*"))


def comfy_sampler(name):
    import comfy.samplers

    return comfy.samplers.sampler_object(name)


def test_linear_ag_says_when_the_steps_leave_nothing_to_fit(comfyui, models_dir):
    base = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models.build("sd15")
    with pytest.raises(ValueError, match="2 steps leave no step with 2 earlier ones"):
        lag._calibrate(comfyui, base, steps=2, history=2, name="short")


def test_calibrations_record_the_prediction_type_and_check_the_model_sampled(comfyui, models_dir):
    """eps and v-prediction share weights and ComfyUI's ModelSamplingDiscrete class: the prediction type is a key
    of its own. LinearAG and the DiT cache compared the model only when the node was applied, so a LoRA wired
    after them went unchecked; they now check the model being sampled."""
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    model, record = v3._calibrate(comfyui, "sd15", name="eps")
    assert record.keys["prediction"] == "EPS"
    vpred = nodes["ModelSamplingDiscrete"]().patch(model, "v_prediction", False)[0]
    with pytest.raises(ValueError, match="prediction: calibrated for 'EPS', this model 'V_PREDICTION"):
        v3._sample(comfyui, vpred, record)
    with pytest.raises(ValueError, match=f"prediction: .*{OTHER}"):     # not reused for the v-prediction model
        nodes["TrainFreeDPMSolverV3Calibrate"]().calibrate(
            vpred, tiny.conditioning("sd15", 1), tiny.conditioning("sd15", 2), {"samples": torch.zeros(8, 4, 8, 8)},
            4.0, 16, 16, 8, "per channel (any resolution)", 0, "eps", False)

    def lora(m):
        out = m.clone()
        key = next(k for k in m.model_state_dict() if k.endswith(("attn2.to_q.weight", "attn.qkv.weight",
                                                                    "img_attn.qkv.weight")))
        out.add_patches({key: (torch.full_like(m.model_state_dict()[key], 0.05),)}, 1.0)
        return out

    rec = lag._calibrate(comfyui, model, name="lag_lora")
    with pytest.raises(ValueError, match="belong to another model .*model: calibrated for"):
        lag._sample(comfyui, lora(lag._patch(comfyui, model, rec)))
    flux = tiny.build("flux")
    sch = cq._calibrate(comfyui, flux, "flux", steps=8, name="cq_lora")
    assert sch.keys["prediction"] == "CONST"
    with pytest.raises(ValueError, match="calibrated for another model .*model: calibrated for"):
        cq._sample(comfyui, lora(cq._cache(comfyui, flux, "flux", schedule=sch)), "flux")
