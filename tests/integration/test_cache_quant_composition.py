"""The DiT block cache beside other passes and patches: PAG's perturbed pass and other extra passes, a Flux
ControlNet, NASA adding its tokens inside the span's first block."""
import logging

import pytest
import torch

from test_cache_quant_nodes import _cache, _node, _sample, _tiny


def test_an_extra_pass_with_other_patches_never_shares_the_plain_residual(comfyui, monkeypatch):
    """A PAG-like post-CFG pass of the positive prompt with a patched head block: with cond and uncond run apart
    its chunk looks like the positive one except for the patches; its residual must stay its own."""
    import comfy.model_patcher
    import comfy.samplers

    base = _tiny(comfyui).build("flux")
    plain = _cache(comfyui, base, "flux")
    monkeypatch.setattr(base.model, "memory_required", lambda *a, **k: float("inf"))
    ref = _sample(comfyui, plain, "flux")

    def head(args, extra):                                            # the perturbation, outside the span
        out = extra["original_block"](args)
        return {"img": out["img"] * 1.5, "txt": out["txt"]}

    passes = []

    def post_cfg(args):
        mo = comfy.model_patcher.set_model_options_patch_replace(args["model_options"].copy(), head, "dit",
                                                                 "double_block", 0)
        passes.append(comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                     mo)[0])
        return args["denoised"]                                       # the extra pass is computed, not used

    extra = plain.clone()
    extra.set_model_sampler_post_cfg_function(post_cfg)
    assert torch.equal(_sample(comfyui, extra, "flux"), ref) and len(passes) == 8


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_pags_extra_pass_is_cached_too_and_reruns_are_identical(comfyui, arch):
    """PAG rebuilds its block patches at every step; the cache keys patches by what they are, so the perturbed
    pass finds its own residual again (it was keyed by id(): never cached, or cached when an address was
    reused, so identical runs differed)."""
    base = _tiny(comfyui).build(arch)
    pag = _node(comfyui, "TrainFreePAG").patch(base, 3.0, "", 0.0, 1.0)[0]
    m = _cache(comfyui, pag, arch)
    cfg = m.model_options["transformer_options"]["trainfree_dit_cache"]
    first = _sample(comfyui, m, arch, steps=9, cfg=4.0)
    assert "6 full and 12 cached evaluations" in cfg.last_report       # 9 CFG + 9 PAG calls, every 3rd step full
    for _ in range(3):
        assert torch.equal(_sample(comfyui, m, arch, steps=9, cfg=4.0), first)
    assert not torch.equal(first, _sample(comfyui, _cache(comfyui, base, arch), arch, steps=9, cfg=4.0))


def _tiny_flux_controlnet(comfyui, seed=7):
    import comfy.controlnet
    import comfy.ldm.flux.controlnet as flux_cn
    import comfy.ops

    tiny = _tiny(comfyui)
    cfg = {k: v for k, v in tiny._config("flux").unet_config.items() if k != "image_model"}
    net = flux_cn.ControlNetFlux(operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                 device=torch.device("cpu"), **cfg)
    tiny._reinit(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"), extra_conds=["y", "guidance"])


def test_a_flux_controlnet_keeps_its_window_on_cached_steps(comfyui):
    """Flux adds ControlNet residuals between the blocks, in place: the cached residual leaves them out and a
    cached step adds the current ones. Before, a ControlNet ending at 10% acted 2.9x too strongly (its step-0
    additions rode along in the reused residual) and one active only on cached steps was dropped."""
    import comfy.sample

    tiny, cn = _tiny(comfyui), _tiny_flux_controlnet(comfyui)
    flux = tiny.build("flux")
    cached = _cache(comfyui, flux, "flux")
    apply = comfyui.nodes.NODE_CLASS_MAPPINGS["ControlNetApplyAdvanced"]()
    hint = torch.rand((2, 64, 64, 3), generator=torch.Generator().manual_seed(3))
    noise = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(4))

    def run(model, window=None):
        pos, neg = tiny.conditioning("flux", 1, 2), tiny.conditioning("flux", 2, 2)
        if window:
            pos, neg = apply.apply_controlnet(pos, neg, cn, hint, 1.0, *window)
        return comfy.sample.sample(model, noise, 6, 1.0, "euler", "simple", pos, neg, torch.zeros_like(noise),
                                   seed=4, disable_pbar=True)

    plain_none, cached_none = run(flux), run(cached)
    for window in ((0.0, 0.1), (0.1, 0.3), (0.5, 1.0), (0.0, 1.0)):
        effect = float((run(flux, window) - plain_none).abs().max())
        with_cache = float((run(cached, window) - cached_none).abs().max())
        assert effect > 0.05 and 0.8 < with_cache / effect < 1.25, (window, effect, with_cache)


@pytest.mark.parametrize("arch", ["sd3", "flux", "chroma", "qwen_image", "ltxv", "hunyuan_video", "auraflow"])
@pytest.mark.parametrize("tail", [0, 1])
def test_nasa_then_the_cache_from_the_first_block(comfyui, caplog, arch, tail):
    """NASA on SD3, Flux, Chroma, Qwen-Image, HunyuanVideo and AuraFlow appends its negative tokens inside the first
    block (Flux, Chroma, Qwen, HunyuanVideo: and widens each block's rotary table); a cache span starting there
    (head_blocks 0) still matches the uncached run at interval 1 and skips the span at cached steps. The negative
    is shorter than the prompt (9 of 16 tokens)."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    neg = [[tiny.conditioning(arch, 3)[0][0][:, :9], {}]]
    nasa = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeNASA"]().patch(base, neg, 0.5)[0]
    ref = _sample(comfyui, nasa, arch)
    assert not torch.equal(ref, _sample(comfyui, base, arch))        # NASA acts
    cache = _node(comfyui, "TrainFreeDiTCache")
    assert torch.equal(_sample(comfyui, cache.patch(nasa, 1, 0, tail)[0], arch), ref)
    nasa_after = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeNASA"]().patch(cache.patch(base, 1, 0, tail)[0], neg,
                                                                             0.5)[0]
    assert torch.equal(_sample(comfyui, nasa_after, arch), ref)       # the other order
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out = _sample(comfyui, cache.patch(nasa, 3, 0, tail)[0], arch)
    assert "5 cached evaluations" in caplog.text
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.1
