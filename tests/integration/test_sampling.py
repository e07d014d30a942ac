"""Real sampling through ComfyUI's executor with tiny random SD1.5/SDXL/SD3/Flux models."""
import pytest
import torch

from prompts import SAMPLER_NODES, custom_advanced, ksampler

ARCHS = ["sd15", "sdxl", "sd3", "flux"]


def _stats(outputs):
    (text,) = outputs["stats"]["text"]
    return text, outputs["stats"]["sum"][0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("node", sorted(SAMPLER_NODES))
def test_sampler_node_in_custom_advanced(comfyui, arch, node):
    ok, out, err = comfyui.run(custom_advanced(node, SAMPLER_NODES[node], arch=arch))
    assert ok, err
    text, _ = _stats(out)
    assert "finite=True" in text and "std=0 " not in text


@pytest.mark.parametrize("arch", ["sd15", "flux"])
@pytest.mark.parametrize("name", ["trainfree_ghvb", "trainfree_plms_hb", "trainfree_dpmpp_2m_hb",
                                  "trainfree_ts_ddim", "trainfree_ts_dpmpp_2m"])
def test_dropdown_sampler_in_plain_ksampler(comfyui, arch, name):
    ok, out, err = comfyui.run(ksampler(name, arch=arch))
    assert ok, err
    assert "finite=True" in _stats(out)[0]


def test_progress_bar_advances_every_step(comfyui):
    import comfy.utils as cu

    seen = []
    old = cu.PROGRESS_BAR_HOOK
    cu.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        ok, _, err = comfyui.run(custom_advanced("TrainFreeGHVBSampler", {"order": 2.5}, steps=7, seed=11))
    finally:
        cu.set_progress_bar_global_hook(old)
    assert ok, err
    assert [v for v, t in seen if t == 7] == list(range(1, 8))


def _direct(comfyui, arch, sampler, steps=8, scheduler="normal", batch=1):
    """comfy.samplers.sample with a SAMPLER object on a tiny model (no executor caching)."""
    import comfy.sample
    import comfy.samplers

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build(arch)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(batch, 4, 8, 8))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    return comfy.samplers.sample(model, noise, tiny.conditioning(arch, 1, batch), tiny.conditioning(arch, 2, batch),
                                 4.0, model.load_device, sampler, sigmas, model_options=model.model_options,
                                 latent_image=latent, seed=3)


@pytest.mark.parametrize("arch", ARCHS + ["sd15_v", "sdxl_vzsnr"])
def test_ghvb_order_one_is_comfys_euler(comfyui, arch):
    """r = 1: no momentum, first order: ComfyUI's euler, on every model family."""
    import comfy.samplers

    ghvb = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeGHVBSampler"]().get_sampler(1.0)[0]
    ours, euler = _direct(comfyui, arch, ghvb), _direct(comfyui, arch, comfy.samplers.sampler_object("euler"))
    assert torch.allclose(ours, euler, rtol=1e-4, atol=1e-4 * float(euler.abs().max()))


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd15_v", "sdxl_vzsnr"])
def test_dpmpp_2m_hb_at_beta_one_is_comfys_dpmpp_2m(comfyui, arch):
    import comfy.samplers

    hb = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMPP2MHeavyBallSampler"]().get_sampler(1.0)[0]
    ours = _direct(comfyui, arch, hb, steps=16, scheduler="karras")
    ref = _direct(comfyui, arch, comfy.samplers.sampler_object("dpmpp_2m"), steps=16, scheduler="karras")
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_split_schedules_continue_exactly_and_a_one_value_half_is_a_no_op(comfyui, arch):
    """SplitSigmas: a pack sampler on the first half, core's on the second, equals core's dpmpp_2m over the
    whole schedule (no first-order step at the split); and a one-value half returns the latent as core does."""
    import comfy.sample
    import comfy.samplers

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build(arch)
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, 8, 8))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 16)
    pos, neg = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2)

    def run(sampler, sigmas, start, add_noise=True):
        return comfy.samplers.sample(model, noise if add_noise else torch.zeros_like(noise), pos, neg, 4.0,
                                     model.load_device, sampler, sigmas, latent_image=start, seed=3)
    hb = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDPMPP2MHeavyBallSampler"]().get_sampler(1.0)[0]
    core = comfy.samplers.sampler_object("dpmpp_2m")
    half = run(hb, sig[:9], latent)
    if arch == "sd15":        # on flow models the pack's 2M steps in the exact VE variables, core's does not
        torch.testing.assert_close(half, run(core, sig[:9], latent), rtol=1e-4, atol=1e-4 * float(half.abs().max()))
    same = run(core, sig[-1:], half, add_noise=False)              # core: the latent back (latent format round trip)
    torch.testing.assert_close(same, half, rtol=1e-5, atol=1e-5)
    for name in ("trainfree_ghvb", "trainfree_dpmpp_2m_cfg_pp"):
        assert torch.equal(run(comfy.samplers.sampler_object(name), sig[-1:], half, add_noise=False), same)
    assert torch.equal(run(hb, sig[-1:], half, add_noise=False), same)


@pytest.mark.parametrize("node", sorted(SAMPLER_NODES))
def test_reruns_are_bit_identical_and_batch_rows_independent(comfyui, node):
    cls = comfyui.nodes.NODE_CLASS_MAPPINGS[node]
    sampler = getattr(cls(), cls.FUNCTION)(**SAMPLER_NODES[node])[0]
    a, b = _direct(comfyui, "sd15", sampler), _direct(comfyui, "sd15", sampler)
    assert torch.equal(a, b)
    batch = _direct(comfyui, "flux", sampler, batch=2)
    assert batch.shape[0] == 2 and torch.isfinite(batch).all()


def test_failed_prompt_keeps_the_executor_working(comfyui):
    """Ascending sigmas are refused with a clear message; the next prompt runs normally."""
    ok, _, err = comfyui.run(custom_advanced("TrainFreeGHVBSampler", {"order": 3.5}, flip_sigmas=True))
    assert not ok
    message = err[0][1]["exception_message"]
    assert "strictly decreasing" in message
    ok, out, err = comfyui.run(custom_advanced("TrainFreeGHVBSampler", {"order": 3.5}, seed=5))
    assert ok, err


def test_second_run_at_another_resolution_and_batch(comfyui):
    for size, batch in ((64, 1), (96, 3)):
        ok, out, err = comfyui.run(custom_advanced("TrainFreeTimeShiftDPMPP2MSampler",
                                                 SAMPLER_NODES["TrainFreeTimeShiftDPMPP2MSampler"],
                                                 size=size, batch=batch))
        assert ok, err
        assert f"shape=({batch}, 4, {size // 8}, {size // 8})" in _stats(out)[0]


def test_out_of_range_option_is_refused_at_validation(comfyui):
    ok, _, err = comfyui.run(custom_advanced("TrainFreeGHVBSampler", {"order": 9.0}))
    assert not ok and err[0][0] == "validation"


def test_composes_with_lora_style_weight_patch_and_pag(comfyui):
    """A weight patch (what LoRA loaders add) and core's PAG post-CFG patch change the result and
    keep it finite; removing them restores the unpatched result bit for bit."""
    import comfy.samplers
    import comfy_extras.nodes_pag as pag

    node = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeGHVBSampler"]
    sampler = node().get_sampler(2.5)[0]
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    base = tiny.build("sd15")
    key = next(k for k in base.model_state_dict() if k.endswith("attn2.to_q.weight"))
    lora = base.clone()
    lora.add_patches({key: (torch.full_like(base.model_state_dict()[key], 0.05),)}, 1.0)
    patched = pag.PerturbedAttentionGuidance.execute(lora, 2.0)[0]

    def run(model):
        latent = torch.zeros(2, 4, 8, 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
        sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 6)
        return comfy.samplers.sample(model, noise, tiny.conditioning("sd15", 1, 2), tiny.conditioning("sd15", 2, 2),
                                     4.0, model.load_device, sampler, sig, model_options=model.model_options,
                                     latent_image=latent, seed=5)

    plain = run(base)
    with_patches = run(patched)
    assert torch.isfinite(with_patches).all() and not torch.allclose(plain, with_patches)
    assert torch.equal(run(base), plain)
