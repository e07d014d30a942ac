"""Wan's variants (camera control, HuMo, Animate, speech-to-video, VACE) and Wan 2.1 image-to-video run without
CLIP-vision tokens: what NASA steers in each, PAG and the DiT cache on them, and the variants refused, with their
reasons."""
import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny


def _without_clip(cond):
    return [[cond[0][0], {k: v for k, v in cond[0][1].items() if k != "clip_vision_output"}]]


def _first_block(comfyui, arch, drop_clip, patch):
    """(the plain model's first-block attention outputs, the input of cross_attn.o in the plain and patched
    models) with negative = positive; ``patch(base, pos)`` makes the patched model."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    if drop_clip:
        pos = _without_clip(pos)
    o_in, calls = [], []
    hook = base.model.diffusion_model.blocks[0].cross_attn.o.register_forward_hook(
        lambda mod, inp, out: o_in.append(inp[0].clone()))
    plain = base.clone()

    def record(func, *a, **kw):
        out = func(*a, **kw)
        calls.append(out.clone())
        return out
    plain.model_options["transformer_options"]["optimized_attention_override"] = record
    try:
        _sample(plain, pos, pos, noise, steps=1)
        _sample(patch(base, pos), pos, pos, noise, steps=1)
    finally:
        hook.remove()
    return calls, o_in


@pytest.mark.parametrize("arch, drop_clip", [("wan_i2v", False), ("wan_camera", False), ("wan_animate", False),
                                             ("wan_i2v", True), ("wan_camera", True), ("wan_humo", False)])
def test_nasa_steers_the_attentions_over_the_prompt_in_every_wan_variant(comfyui, arch, drop_clip):
    """Wan 2.1 image-to-video's cross-attention adds an attention over the start image's CLIP-vision tokens to the
    one over the text: o(Z_text + Z_image), Z_text and Z_image being the plain model's two outputs. Negative =
    positive, alpha 0.3: the first block's o input is 0.7 Z_text + Z_image with CLIP-vision tokens (image-to-video,
    camera control: the image branch is left alone); without them
    (Animate here, or no clip_vision_output) Wan 2.1's image branch attends the prompt too and both are steered:
    0.7 (Z_text + Z_image); HuMo's text attention gives 0.7 Z_text and its audio attention (a third call) is left
    alone."""
    calls, o_in = _first_block(comfyui, arch, drop_clip, lambda base, pos: _nasa(comfyui, base, pos, 0.3))
    if arch == "wan_humo":
        z_text, z_audio = calls[1], calls[2]
        assert z_audio.shape[0] == 2 * z_text.shape[0]      # the audio attention: one row per latent frame
        torch.testing.assert_close(o_in[0], z_text, rtol=0, atol=1e-6)
        torch.testing.assert_close(o_in[1], 0.7 * z_text, rtol=1e-5, atol=1e-6)
        return
    z_image, z_text = calls[1], calls[2]
    assert (z_image - z_text).abs().max() > 1e-3
    torch.testing.assert_close(o_in[0], z_text + z_image, rtol=0, atol=1e-6)
    with_clip = not drop_clip and arch != "wan_animate"
    expected = 0.7 * z_text + z_image if with_clip else 0.7 * (z_text + z_image)
    torch.testing.assert_close(o_in[1], expected, rtol=1e-5, atol=1e-6)


def test_two_nasa_nodes_add_on_both_branches_without_clip_tokens(comfyui):
    """Two NASA nodes with negatives equal to the prompt (alpha 0.2 and 0.3) on Wan 2.1 image-to-video without
    CLIP-vision tokens give 0.5 (Z_text + Z_image): each node counts only the calls that reach it from the block,
    not the other's negative-prompt calls."""
    calls, o_in = _first_block(comfyui, "wan_i2v", True,
                               lambda base, pos: _nasa(comfyui, _nasa(comfyui, base, pos, 0.2), pos, 0.3))
    torch.testing.assert_close(o_in[1], 0.5 * (calls[1] + calls[2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["wan_camera", "wan_humo", "wan_animate"])
def test_pag_and_the_dit_cache_run_on_the_variants(comfyui, arch):
    """PAG reaches the blocks (the guided sample moves by more than 1% of its size); the DiT cache (camera control,
    HuMo) is bit-identical at interval 1 and skips its span at the cached steps at interval 3; Animate is refused
    by the cache: its face features enter between the blocks."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, neg, noise = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), _noise(arch)
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    plain = _sample(base, pos, neg, noise, cfg=3.0)
    guided = _sample(nodes["TrainFreePAG"]().patch(base, 2.0)[0], pos, neg, noise, cfg=3.0)
    assert float((guided - plain).norm() / plain.norm()) > 0.01
    cache = nodes["TrainFreeDiTCache"]()
    if arch == "wan_animate":
        with pytest.raises(ValueError, match="face features between the blocks"):
            cache.patch(base, 1, 1, 0)
        return
    torch.testing.assert_close(_sample(cache.patch(base, 1, 1, 0)[0], pos, neg, noise, cfg=3.0), plain, rtol=0, atol=0)
    ran = []
    hook = base.model.diffusion_model.blocks[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        cached = _sample(cache.patch(base, 3, 1, 0)[0], pos, neg, noise, steps=6, cfg=3.0)
    finally:
        hook.remove()
    assert 0 < len(ran) < 6
    assert float((cached - _sample(base, pos, neg, noise, steps=6, cfg=3.0)).norm() / plain.norm()) < 0.2


def test_speech_to_video_is_refused_by_name(comfyui):
    """ComfyUI 0.3.64's S2V network calls its blocks without the transformer options (PAG's and NASA's attention
    changes could not reach them) and adds audio features between the blocks, computed from the stream a block cache
    would skip."""
    tiny = _tiny(comfyui)
    base = tiny.build("wan_s2v")
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    for call in (lambda: nodes["TrainFreePAG"]().patch(base, 2.0),
                 lambda: _nasa(comfyui, base, tiny.conditioning("wan_s2v", 2), 0.5)):
        with pytest.raises(ValueError, match="speech-to-video.*transformer options"):
            call()
    with pytest.raises(ValueError, match="speech-to-video adds its audio features between the blocks"):
        nodes["TrainFreeDiTCache"]().patch(base, 1, 1, 0)


def _vace(tiny, seed, strength=1.0):
    """The prompt with a random control video (the tiny model's 16 + 16 control channels, its mask left to ComfyUI)."""
    (t, extra), = tiny.conditioning("wan_vace", 1)
    video = torch.randn(1, 32, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    return [[t, dict(extra, vace_frames=[video], vace_strength=[strength])]]


def test_dit_cache_on_vace_passes_each_steps_control_hints_on(comfyui, monkeypatch, caplog):
    """VACE's control blocks add their hints to the stream after blocks 0 and 1, computed from the control video and
    the patch-embedded input alone. The cache over both blocks (head 0, tail 0) at a cached step passes block 0's input
    on, the network adds this step's hint, and block 1 gives the stored residual less the full step's hints. Interval
    1 is bit-identical; at interval 3 the control blocks see the patch-embedded input at every step (a skipped block
    must not hand on the network's own input, to which the hint is then added in place); another control video
    changes the cached sample as it changes the plain one; with the hints taken for part of the residual (a mutation)
    the cached sample is further from the plain one."""
    import logging

    tiny = _tiny(comfyui)
    cfg = tiny._config("wan_vace")
    cfg.unet_config["vace_layers"] = 2           # a control block after each of the two blocks, as real VACE has
    base = tiny.patcher(cfg)                     # them every few blocks
    dm = base.model.diffusion_model
    assert dm.vace_layers_mapping == {0: 0, 1: 1}
    cache = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDiTCache"]()
    noise = _noise("wan_vace")
    ref = _sample(base, _vace(tiny, 7), _vace(tiny, 7), noise, steps=8)
    assert torch.equal(_sample(cache.patch(base, 1, 0, 0)[0], _vace(tiny, 7), _vace(tiny, 7), noise, steps=8), ref)
    embedded, seen = [], []
    def embed(m, i, out):                       # a copy: the network's input is a view of this output
        embedded.append(out.flatten(2).transpose(1, 2).clone())

    def control(m, a, kw):
        seen.append(float((kw["x"] - embedded[-1]).abs().max()))
    hooks = [dm.patch_embedding.register_forward_hook(embed),
             *(block.register_forward_pre_hook(control, with_kwargs=True) for block in dm.vace_blocks)]
    try:
        with caplog.at_level(logging.INFO, logger="trainfree"):
            out = _sample(cache.patch(base, 3, 0, 0)[0], _vace(tiny, 7), _vace(tiny, 7), noise, steps=8)
    finally:
        for h in hooks:
            h.remove()
    assert "3 full and 5 cached evaluations; span blocks run 6, skipped 10" in caplog.text
    assert len(seen) == 16 and max(seen) == 0.0
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < 0.05
    other = _sample(cache.patch(base, 3, 0, 0)[0], _vace(tiny, 8), _vace(tiny, 8), noise, steps=8)
    effect = _sample(base, _vace(tiny, 8), _vace(tiny, 8), noise, steps=8) - ref
    assert float(((other - out) - effect).norm() / effect.norm()) < 0.05          # measured 0.004 (effect: 6%)
    mod = comfyui.module_of("TrainFreeDiTCache")
    real = mod._Config.new_run

    def unhinted(self, steps):
        run = real(self, steps)
        run.hinted = False
        return run
    monkeypatch.setattr(mod._Config, "new_run", unhinted)
    wrong = _sample(cache.patch(base, 3, 0, 0)[0], _vace(tiny, 7), _vace(tiny, 7), noise, steps=8)
    assert float((wrong - ref).norm() / ref.norm()) > 10 * err           # measured 0.065 against 0.0027
