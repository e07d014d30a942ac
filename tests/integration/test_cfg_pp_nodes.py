"""CFG++ samplers in real ComfyUI: equal to core's where core is exact, exact for flow where core is
not, every entry samples on tiny SD1.5 and Flux models, composition with guidance patches and caches."""
import pytest
import torch

from prompts import custom_advanced, ksampler

SOLVERS = ["dpmpp_2m", "dpmpp_2m_hb", "plms", "plms_hb", "ghvb", "ts_ddim", "ts_dpmpp_2m", "uni_pc_bh2"]


def _direct(comfyui, arch, sampler, cfg=0.6, steps=8, batch=1, model=None, negative=True, scheduler="normal"):
    import comfy.sample
    import comfy.samplers

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build(arch) if model is None else model
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(batch, 4, 8, 8))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    if isinstance(sampler, str):
        sampler = comfy.samplers.sampler_object(sampler)
    neg = tiny.conditioning(arch, 2, batch) if negative else None
    if negative:
        return comfy.samplers.sample(model, noise, tiny.conditioning(arch, 1, batch), neg, cfg, model.load_device,
                                     sampler, sigmas, model_options=model.model_options, latent_image=latent, seed=3)
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": tiny.conditioning(arch, 1, batch)})
    guider.cfg = cfg
    return guider.sample(noise, latent, sampler, sigmas, seed=3)


def _close(a, b, tol=1e-4):
    return torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def _pure(comfyui, name, **opts):
    """A KSAMPLER running one of the pure CFG++ samplers through the node layer's post-CFG capture."""
    import comfy.samplers

    import importlib

    mod = comfyui.module_of("TrainFreeCFGppSampler")
    pure = importlib.import_module(comfyui.pack().__name__ + ".samplers.cfg_pp")
    return comfy.samplers.KSAMPLER(mod.with_uncond(getattr(pure, f"sample_{name}_cfg_pp")), extra_options=opts)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_equal_to_core_euler_and_dpmpp_2m_cfg_pp_on_eps_models(comfyui, arch):
    for ours, core in ((_pure(comfyui, "euler"), "euler_cfg_pp"), ("trainfree_dpmpp_2m_cfg_pp", "dpmpp_2m_cfg_pp")):
        a, b = _direct(comfyui, arch, ours), _direct(comfyui, arch, core)
        assert _close(a, b) and torch.isfinite(a).all()


def test_flow_exact_where_core_uses_the_literal_ve_formula(comfyui):
    """Flux (CONST): core's euler_cfg_pp is exact and equals ours; core's dpmpp_2m_cfg_pp applies the VE
    formula to flow sigmas: it equals our solver forced to read the model as VE, and differs from ours."""
    a, b = _direct(comfyui, "flux", _pure(comfyui, "euler")), _direct(comfyui, "flux", "euler_cfg_pp")
    assert _close(a, b)
    ours = _direct(comfyui, "flux", "trainfree_dpmpp_2m_cfg_pp")
    core = _direct(comfyui, "flux", "dpmpp_2m_cfg_pp")
    literal = _direct(comfyui, "flux", _pure(comfyui, "dpmpp_2m", kind="ve"))
    assert _close(literal, core)
    assert float((ours - core).abs().max()) > 0.05 * float(core.abs().max())


@pytest.mark.parametrize("arch", ["sd15", "flux"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_dropdown_entry_samples_in_plain_ksampler(comfyui, arch, solver):
    ok, out, err = comfyui.run(ksampler(f"trainfree_{solver}_cfg_pp", arch=arch, cfg=0.6))
    assert ok, err
    (text,) = out["stats"]["text"]
    assert "finite=True" in text and "std=0 " not in text


@pytest.mark.parametrize("solver", SOLVERS + ["dpm_solver_v3"])
def test_node_in_custom_advanced(comfyui, solver):
    ok, out, err = comfyui.run(custom_advanced("TrainFreeCFGppSampler", {"solver": solver}, arch="flux", cfg=0.6))
    assert ok, err
    assert "finite=True" in out["stats"]["text"][0]


@pytest.mark.parametrize("solver", ["uni_pc_bh2", "ts_dpmpp_2m"])
def test_batch_rows_with_their_own_prompts_are_independent_and_reruns_identical(comfyui, solver):
    """Row 0 of a 2-prompt batch is what its prompt gives alone (same noise row, same conditioning row)."""
    s = f"trainfree_{solver}_cfg_pp"
    both = _direct(comfyui, "sd15", s, batch=2)
    assert torch.equal(both, _direct(comfyui, "sd15", s, batch=2))
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    assert not torch.equal(tiny.conditioning("sd15", 1, 2)[0][0][0], tiny.conditioning("sd15", 1, 2)[0][0][1])
    assert float((both[0] - both[1]).abs().max()) > 1e-3
    assert _close(both[:1], _direct(comfyui, "sd15", s, batch=1), tol=1e-5)


def test_cfg_one_still_renoises_with_the_negative_prompt(comfyui):
    """cfg 1 is lambda = 1 (the unconditional pass is kept, as in core): not plain conditional sampling."""
    pp = _direct(comfyui, "sd15", "trainfree_dpmpp_2m_cfg_pp", cfg=1.0)
    plain = _direct(comfyui, "sd15", "dpmpp_2m", cfg=1.0)
    assert torch.isfinite(pp).all() and float((pp - plain).abs().max()) > 1e-3
    assert _close(pp, _direct(comfyui, "sd15", "dpmpp_2m_cfg_pp", cfg=1.0))


def test_without_a_negative_prompt_a_clear_error(comfyui):
    mod = comfyui.module_of("TrainFreeCFGppSampler")
    sampler = mod.TrainFreeCFGppSampler().get_sampler("ghvb")[0]
    with pytest.raises(RuntimeError, match="negative"):
        _direct(comfyui, "sd15", sampler, negative=False)
    with pytest.raises(ValueError, match="dpm_solver_v3"):
        mod.TrainFreeCFGppSampler().get_sampler("ghvb", ems=object())


def test_adaptive_guidance_switched_off_rows_get_the_plain_conditional_step(comfyui):
    """AG at threshold 0 turns guidance off after step 1: then D_lam = D_u = D_c and the CFG++ step is the
    base solver's step on the conditional prediction; its unconditional passes are still saved."""
    import comfy.patcher_extension as pe

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    ag = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]()
    base = tiny.build("sd15")
    s = "trainfree_dpmpp_2m_cfg_pp"
    assert torch.equal(_direct(comfyui, "sd15", s, model=ag.patch(base, 1.0)[0]), _direct(comfyui, "sd15", s))
    rows = []
    m = ag.patch(base, 0.0)[0].clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "count_rows",
                           lambda ex, x, *a, **k: rows.append(x.shape[0]) or ex(x, *a, **k))
    out = _direct(comfyui, "sd15", s, model=m, steps=6, batch=2)
    assert torch.isfinite(out).all() and sum(rows) == 2 * 2 + 5 * 2
    assert float((out - _direct(comfyui, "sd15", s, steps=6, batch=2)).abs().max()) > 1e-3


def test_two_guidance_patches_and_a_cache_in_one_graph(comfyui):
    """Core's PAG (post-CFG) + Adaptive Guidance (keyed CALC_COND_BATCH) + core's EasyCache, with a CFG++
    sampler: finite, and each patch changes the result."""
    import comfy_extras.nodes_easycache as ec
    import comfy_extras.nodes_pag as pag

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    base = tiny.build("sd15")
    ag = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]().patch(base, 0.9999)[0]
    both = pag.PerturbedAttentionGuidance.execute(ag, 2.0)[0]
    cached = ec.EasyCacheNode.execute(both, 0.2, 0.15, 0.95, False)[0]
    s = "trainfree_ghvb_cfg_pp"
    plain, out = _direct(comfyui, "sd15", s, model=base), _direct(comfyui, "sd15", s, model=cached)
    assert torch.isfinite(out).all() and float((out - plain).abs().max()) > 1e-4


def test_dpm_solver_v3_with_statistics_and_refused_on_another_model(comfyui, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "trainfree", ([str(tmp_path)], {".safetensors"}))
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build("sd15")
    record = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMSolverV3Calibrate"]().calibrate(
        model=model, positive=tiny.conditioning("sd15", 1), negative=tiny.conditioning("sd15", 2),
        latent_image={"samples": torch.zeros(4, 4, 8, 8)}, cfg=4.0, samples=8, grid_points=8, data_steps=5,
        statistics="per channel (any resolution)", seed=0, name="cfgpp_v3", overwrite=True)[0]
    node = comfyui.module_of("TrainFreeCFGppSampler").TrainFreeCFGppSampler()
    with_ems = _direct(comfyui, "sd15", node.get_sampler("dpm_solver_v3", ems=record)[0], model=model, steps=6)
    plain = _direct(comfyui, "sd15", node.get_sampler("dpm_solver_v3")[0], model=model, steps=6)
    assert torch.isfinite(with_ems).all() and not torch.equal(with_ems, plain)
    with pytest.raises(ValueError, match="another model"):
        _direct(comfyui, "sd15", node.get_sampler("dpm_solver_v3", ems=record)[0], model=tiny.build("sd15", seed=3))
