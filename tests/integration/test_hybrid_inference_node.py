"""Hybrid base -> distilled GUIDER in ComfyUI: degenerate switch points, evaluations per model, refusals."""
import pytest
import torch


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _counting(model, label, log):
    import comfy.patcher_extension as pe

    def count(executor, x, *args, **kwargs):
        log.append((label, x.shape[0]))
        return executor(x, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "count_" + label, count)
    return m


def _sigmas(model, steps):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)


def _run(guider, noise, sigmas, sampler="euler"):
    import comfy.samplers

    return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object(sampler), sigmas,
                         disable_pbar=True, seed=3)


def _cfg(model, pos, neg, cfg):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return g


def _hybrid(comfyui, base, distilled, pos, neg, base_steps, base_cfg=5.0, distilled_cfg=1.0, substeps=1):
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeHybridGuider"]()
    return node.get_guider(base, distilled, pos, neg, base_cfg, distilled_cfg, base_steps, substeps)[0]


def _case(comfyui, batch=2, arch="sd15"):
    tiny = _tiny(comfyui)
    base, distilled = tiny.build(arch, seed=0), tiny.build(arch, seed=1)
    pos, neg = tiny.conditioning(arch, 1, batch), tiny.conditioning(arch, 2, batch)
    noise = torch.randn((batch, 4 if arch == "sd15" else 16, 8, 8), generator=torch.Generator().manual_seed(7))
    return base, distilled, pos, neg, noise


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_switch_points_zero_and_all_are_the_single_models_bit_for_bit(comfyui, arch):
    base, distilled, pos, neg, noise = _case(comfyui, arch=arch)
    sig = _sigmas(distilled, 6)
    only_distilled = _run(_cfg(distilled, pos, neg, 1.0), noise, sig, "dpmpp_2m")
    only_base = _run(_cfg(base, pos, neg, 5.0), noise, sig, "dpmpp_2m")
    assert torch.equal(_run(_hybrid(comfyui, base, distilled, pos, neg, 0), noise, sig, "dpmpp_2m"), only_distilled)
    for k in (6, 50):
        assert torch.equal(_run(_hybrid(comfyui, base, distilled, pos, neg, k), noise, sig, "dpmpp_2m"), only_base)
    assert not torch.allclose(only_base, only_distilled)


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_first_step_is_the_base_models_then_distilled(comfyui, arch):
    """6 steps, batch 2, base_steps 1: the base model runs once with CFG (cond + uncond rows), the distilled
    model five times without; the result is the two chained single-model runs (the hand-off is exact in
    both sigma spaces: ComfyUI's noise scaling of a zero noise and its inverse round-trip the latent)."""
    base, distilled, pos, neg, noise = _case(comfyui, arch=arch)
    sig = _sigmas(distilled, 6)
    log = []
    out = _run(_hybrid(comfyui, _counting(base, "base", log), _counting(distilled, "distilled", log), pos, neg, 1),
               noise, sig)
    assert log == [("base", 4)] + [("distilled", 2)] * 5
    first = _run(_cfg(base, pos, neg, 5.0), noise, sig[:2])
    chained = _cfg(distilled, pos, neg, 1.0).sample(torch.zeros_like(noise), first, _sampler("euler"), sig[1:],
                                                    disable_pbar=True, seed=3)
    assert torch.equal(out, chained)
    log.clear()
    sub = _run(_hybrid(comfyui, _counting(base, "base", log), _counting(distilled, "distilled", log), pos, neg, 1,
                       substeps=3), noise, sig)
    assert log == [("base", 4)] * 3 + [("distilled", 2)] * 5                # the paper's several base steps
    assert torch.isfinite(sub).all() and not torch.equal(sub, out)
    one_model = _run(_hybrid(comfyui, base, base, pos, neg, 2, base_cfg=3.0, distilled_cfg=3.0), noise, sig)
    torch.testing.assert_close(one_model, _run(_cfg(base, pos, neg, 3.0), noise, sig), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_inpainting_keeps_the_source_outside_the_mask(comfyui, arch):
    """With a noise mask the hand-off must not pass the noisy partial sample as the latent: ComfyUI pastes the
    latent outside the mask at every step. Before the fix the kept half ended 47 (SD1.5) / 51 (Flux) off."""
    base, distilled, pos, neg, noise = _case(comfyui, arch=arch)
    src = torch.randn(noise.shape, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0                                                # denoise the right half only
    sig = _sigmas(distilled, 6)
    for base_steps, substeps in ((1, 1), (2, 3)):
        out = _hybrid(comfyui, base, distilled, pos, neg, base_steps, substeps=substeps).sample(
            noise, src, _sampler("euler"), sig, denoise_mask=mask, disable_pbar=True, seed=3)
        assert float((out[..., :4] - src[..., :4]).abs().max()) < 1e-5
        assert torch.isfinite(out).all() and float((out[..., 4:] - src[..., 4:]).abs().max()) > 0.1
    plain = _hybrid(comfyui, base, distilled, pos, neg, 1).sample(noise, src, _sampler("euler"), sig,
                                                                  disable_pbar=True, seed=3)
    full = torch.ones(1, 1, 8, 8)                                       # a mask of ones changes nothing
    masked = _hybrid(comfyui, base, distilled, pos, neg, 1).sample(noise, src, _sampler("euler"), sig,
                                                                   denoise_mask=full, disable_pbar=True, seed=3)
    torch.testing.assert_close(masked, plain, rtol=1e-4, atol=1e-4)


def _sampler(name):
    import comfy.samplers

    return comfy.samplers.sampler_object(name)


def test_rows_are_independent(comfyui):
    base, distilled, pos, neg, noise = _case(comfyui)
    sig = _sigmas(distilled, 4)
    both = _run(_hybrid(comfyui, base, distilled, pos, neg, 1), noise, sig)
    for i in range(2):
        one = _run(_hybrid(comfyui, base, distilled, [[pos[0][0][i:i + 1], {}]], [[neg[0][0][i:i + 1], {}]], 1),
                   noise[i:i + 1], sig)
        torch.testing.assert_close(both[i:i + 1], one, rtol=0, atol=2e-6 * float(one.abs().max()))


@pytest.mark.parametrize("other", ["flux", "sd3"])
def test_refuses_models_of_another_family_at_queue_time(comfyui, other):
    tiny = _tiny(comfyui)
    with pytest.raises(ValueError, match="sigma space: base is 've', distilled is 'flow'"):
        _hybrid(comfyui, tiny.build("sd15"), tiny.build(other), tiny.conditioning("sd15"), tiny.conditioning("sd15"), 1)


def test_refuses_other_latent_format(comfyui):
    tiny = _tiny(comfyui)
    with pytest.raises(ValueError, match="latent format: base is SD15, distilled is SDXL"):
        _hybrid(comfyui, tiny.build("sd15"), tiny.build("sdxl"), tiny.conditioning("sd15"), tiny.conditioning("sd15"), 1)


def test_in_a_graph_with_samplercustomadvanced(comfyui):
    from prompts import custom_advanced

    prompt = custom_advanced("KSamplerSelect", {"sampler_name": "euler"}, steps=4, seed=2, batch=2)
    prompt["ckpt2"] = {"class_type": "TrainFreeTestTinyCheckpoint", "inputs": {"arch": "sd15", "seed": 1}}
    prompt["guider"] = {"class_type": "TrainFreeHybridGuider", "inputs": {
        "base_model": ["ckpt", 0], "distilled_model": ["ckpt2", 0], "positive": ["pos", 0], "negative": ["neg", 0],
        "base_cfg": 5.0, "distilled_cfg": 1.0, "base_steps": 1, "base_substeps": 1}}
    ok, out, err = comfyui.run(prompt)
    assert ok, err
    prompt["ckpt2"]["inputs"]["arch"] = "flux"
    ok, _, err = comfyui.run(prompt)
    assert not ok and "sigma space" in str(err)
