"""TrainFreeNASA per family: the formula at the first cross-attention (UNet, LTX-Video, Wan VACE; Wan
image-to-video and the other variants: test_wan_variants.py), padding masks, and on joint-attention DiTs the
negative carried as its own text stream."""
import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny


def test_negative_equal_to_positive_scales_the_cross_attention_by_one_minus_alpha(comfyui):
    """First cross-attention layer of the UNet (nothing before it is patched): to_out's input is (1 - alpha) Z+."""
    tiny = _tiny(comfyui)
    base = tiny.build("sd15")
    pos = tiny.conditioning("sd15", 1)
    first = base.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_out[0]
    seen = []
    hook = first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    try:
        _sample(base, pos, pos, _noise("sd15"), steps=1)
        _sample(_nasa(comfyui, base, pos, 0.3), pos, pos, _noise("sd15"), steps=1)
    finally:
        hook.remove()
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], 0.7 * seen[0], rtol=1e-6, atol=1e-6)


def test_wan_vace_steers_the_main_blocks_and_its_control_blocks_keep_the_positive_prompt(comfyui):
    """VACE's control blocks run between the main blocks, outside the block patches: their cross-attention sees the
    positive prompt's 16 tokens alone, the main blocks' the positive and the negative's 9, and the negative moves the
    sample (farther from the negative prompt's own sample)."""
    tiny = _tiny(comfyui)
    base = tiny.build("wan_vace")
    dm = base.model.diffusion_model
    neg = [[tiny.conditioning("wan_vace", 2)[0][0][:, :9], {}]]
    seen = {"main": [], "control": []}
    hooks = [dm.blocks[0].cross_attn.register_forward_hook(
                 lambda mod, inp, out: seen["main"].append(inp[1].shape[1])),
             dm.vace_blocks[0].cross_attn.register_forward_hook(
                 lambda mod, inp, out: seen["control"].append(inp[1].shape[1]))]
    pos, noise = tiny.conditioning("wan_vace", 1), _noise("wan_vace")
    try:
        x = _sample(_nasa(comfyui, base, neg, 0.5), pos, pos, noise, steps=2)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"main": [16 + 9] * 2, "control": [16] * 2}
    x_pos, x_neg = _sample(base, pos, pos, noise, steps=2), _sample(base, neg, neg, noise, steps=2)
    assert float((x - x_neg).norm() / (x_pos - x_neg).norm()) > 1.1


def _ltxv_first_cross_attention(comfyui, model_negative, pos, noise):
    """The input of LTX-Video's first cross-attention output projection (Z, before to_out), one step."""
    tiny = _tiny(comfyui)
    base = tiny.build("ltxv")
    first = base.model.diffusion_model.transformer_blocks[0].attn2.to_out[0]
    seen = []
    hook = first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    try:
        model = base if model_negative is None else _nasa(comfyui, base, model_negative, 0.3)
        _sample(model, pos, pos, noise, steps=1)
    finally:
        hook.remove()
    return seen[0]


def test_ltxv_negative_equal_to_positive_scales_the_cross_attention_by_one_minus_alpha(comfyui):
    tiny = _tiny(comfyui)
    pos, noise = tiny.conditioning("ltxv", 1), _noise("ltxv")
    plain = _ltxv_first_cross_attention(comfyui, None, pos, noise)
    torch.testing.assert_close(_ltxv_first_cross_attention(comfyui, pos, pos, noise), 0.7 * plain, rtol=1e-5,
                               atol=1e-6)


def test_ltxv_negative_padding_is_masked_out(comfyui):
    """A negative padded to 16 tokens with its mask marking 7 as padding acts exactly like its 9 real tokens alone
    (LTX-Video's T5 pads prompts; the mask must reach the negative's keys); without the mask the padding counts."""
    tiny = _tiny(comfyui)
    pos, noise = tiny.conditioning("ltxv", 1), _noise("ltxv")
    t = tiny.conditioning("ltxv", 2)[0][0]
    pad = torch.tensor([[1] * 9 + [0] * 7])
    padded = _ltxv_first_cross_attention(comfyui, [[t, {"attention_mask": pad}]], pos, noise)
    real = _ltxv_first_cross_attention(comfyui, [[t[:, :9], {"attention_mask": torch.ones(1, 9, dtype=torch.long)}]],
                                       pos, noise)
    torch.testing.assert_close(padded, real, rtol=1e-5, atol=1e-6)
    unmasked = _ltxv_first_cross_attention(comfyui, [[t, {}]], pos, noise)
    assert (unmasked - real).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["sd3", "flux", "chroma", "qwen_image", "hunyuan_video", "hunyuan_image", "auraflow"])
@pytest.mark.parametrize("neg_tokens", [16, 9, 27])
def test_joint_attention_carries_the_negative_as_its_own_text_stream(comfyui, arch, neg_tokens):
    """At a vanishing alpha, after the first block, the negative's tokens in NASA's text stream are what the
    negative prompt's own (unpatched) forward computes and the positive's tokens what the positive's computes: the
    two streams share the image tokens but never attend to each other (from the second block on, the negative's
    tokens see the positive's image stream, by design). (The text stream's modulation comes from the pooled
    vector of the positive prompt, so the negative here shares it.) A negative shorter or longer than the positive
    (16 tokens) checks the rotary positions it gets (Qwen-Image: counting up from a start set by the latent size) and
    (HunyuanVideo) that the token refiner pools the negative's own tokens at this step's timesteps."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos = tiny.conditioning(arch, 1)
    neg_t = tiny.conditioning(arch, 2)[0][0]
    neg = [[torch.cat([neg_t, neg_t], 1)[:, :neg_tokens], dict(pos[0][1])]]
    noise = _noise(arch)
    got = _first_block_out(_nasa(comfyui, base, neg, 1e-7), pos, noise)
    want_pos, want_neg = _first_block_out(base, pos, noise), _first_block_out(base, neg, noise)
    t = want_pos["txt"].shape[1]
    assert got["txt"].shape[1] == t + want_neg["txt"].shape[1]
    scale = float(want_pos["txt"].abs().max())
    torch.testing.assert_close(got["txt"][:, :t], want_pos["txt"], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got["txt"][:, t:], want_neg["txt"], rtol=0, atol=1e-5 * scale)


def _first_block_out(model, cond, noise):
    """The first double block's output streams (img, txt) in a one-step cfg-1 sample of ``cond``."""
    from probes import first_block_streams

    m, seen = first_block_streams(model)
    _sample(m, cond, cond, noise, steps=1)
    return seen[0]


@pytest.mark.parametrize("arch", ["hunyuan_video", "hunyuan_image"])
def test_hunyuan_prompts_padding_masks_reach_their_own_streams(comfyui, arch):
    """HunyuanVideo's prompts may come with a padding mask (its text encoder keeps one when a prompt is padded): the
    token refiner and every joint attention mask the padded keys. With a padded positive (4 of 16 tokens) and a
    padded negative (7 of 16), NASA's first double block (alpha vanishing) gives the positive's text and image streams
    of the positive's own forward and the negative's text stream of the negative's own forward, each with its mask;
    dropping the negative's mask changes its stream."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos_t, neg_t = tiny.conditioning(arch, 1)[0], tiny.conditioning(arch, 2)[0][0]
    pos = [[pos_t[0], dict(pos_t[1], attention_mask=torch.tensor([[1] * 12 + [0] * 4]))]]
    neg = [[neg_t, dict(pos_t[1], attention_mask=torch.tensor([[1] * 9 + [0] * 7]))]]
    noise = _noise(arch)
    got = _first_block_out(_nasa(comfyui, base, neg, 1e-7), pos, noise)
    want_pos, want_neg = _first_block_out(base, pos, noise), _first_block_out(base, neg, noise)
    scale = float(want_pos["txt"].abs().max())
    torch.testing.assert_close(got["txt"][:, :16], want_pos["txt"], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got["img"], want_pos["img"], rtol=0, atol=1e-5 * float(want_pos["img"].abs().max()))
    torch.testing.assert_close(got["txt"][:, 16:], want_neg["txt"], rtol=0, atol=1e-5 * scale)
    unmasked = _first_block_out(_nasa(comfyui, base, [[neg_t, dict(pos_t[1])]], 1e-7), pos, noise)
    assert (unmasked["txt"][:, 16:] - want_neg["txt"]).abs().max() > 1e-3 * scale
    with pytest.raises(ValueError, match=r"attention mask \(1, 9\) does not match its \(1, 16\) tokens"):
        _nasa(comfyui, base, [[neg_t, {"attention_mask": torch.ones(1, 9, dtype=torch.long)}]])


def test_hunyuan_image_glyph_tokens_follow_each_prompt(comfyui):
    """HunyuanImage 2.1 appends a prompt's glyph tokens (byT5 features of its quoted text, through ``byt5_in``) to its
    refined text. With glyphs in both prompts (6 and 5 tokens), NASA's first double block (alpha vanishing) gives the
    positive's streams of its own forward and the negative's 16 + 5 text tokens of the negative's own forward."""
    tiny = _tiny(comfyui)
    cfg = tiny._config("hunyuan_image")
    cfg.unet_config["byt5"] = True
    base = tiny.patcher(cfg)
    (pos_t, pos_x), = tiny.conditioning("hunyuan_image", 1)
    neg_t = tiny.conditioning("hunyuan_image", 2)[0][0]
    glyphs = torch.randn(2, 6, 1472, generator=torch.Generator().manual_seed(9))
    pos = [[pos_t, dict(pos_x, conditioning_byt5small=glyphs[:1])]]
    neg = [[neg_t, dict(pos_x, conditioning_byt5small=glyphs[1:, :5])]]
    noise = _noise("hunyuan_image")
    got = _first_block_out(_nasa(comfyui, base, neg, 1e-7), pos, noise)
    want_pos, want_neg = _first_block_out(base, pos, noise), _first_block_out(base, neg, noise)
    assert want_pos["txt"].shape[1] == 22 and want_neg["txt"].shape[1] == 21 and got["txt"].shape[1] == 43
    scale = float(want_pos["txt"].abs().max())
    torch.testing.assert_close(got["txt"][:, :22], want_pos["txt"], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got["img"], want_pos["img"], rtol=0, atol=1e-5 * float(want_pos["img"].abs().max()))
    torch.testing.assert_close(got["txt"][:, 22:], want_neg["txt"], rtol=0, atol=1e-5 * scale)


def _hidream_first_block_out(model, cond, noise):
    """HiDream's first double block's outputs (image, text: [T5; last Llama layer; the block's Llama layer]) in a
    one-step cfg-1 sample of ``cond``; its forward calls no block patches, so a forward hook reads them."""
    seen = []
    block = model.model.diffusion_model.double_stream_blocks[0]
    hook = block.register_forward_hook(lambda mod, inp, out: seen.append([o.clone() for o in out]))
    try:
        _sample(model, cond, cond, noise, steps=1)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("t5_tokens,llama_tokens", [(16, 16), (9, 27), (27, 5)])
def test_hidream_carries_the_negative_through_its_t5_and_llama_streams(comfyui, t5_tokens, llama_tokens):
    """HiDream's blocks attend over [image; T5; last Llama layer; the block's Llama layer]; NASA widens each text part
    with the negative's tokens. At a vanishing alpha, after the first double block, the image stream and the positive's
    text tokens are what the positive's own forward computes and the negative's tokens (T5, last Llama layer, the
    block's layer) what the negative's own forward computes (the pooled vector, which modulates the blocks, is the
    positive's in both). Negatives of other T5 and Llama lengths than the positive's (16, 16) check every part's
    place; swapping the negative's Llama features for the positive's changes its stream."""
    tiny = _tiny(comfyui)
    base = tiny.build("hidream")
    (pos_t, pos_x), = tiny.conditioning("hidream", 1)
    (neg_t, neg_x), = tiny.conditioning("hidream", 2)
    t5 = torch.cat([neg_t, neg_t.flip(1)], 1)[:, :t5_tokens]
    llama = torch.cat([neg_x["conditioning_llama3"], neg_x["conditioning_llama3"].flip(2)], 2)[:, :, :llama_tokens]
    neg = [[t5, dict(pos_x, conditioning_llama3=llama)]]
    noise = _noise("hidream")
    got = _hidream_first_block_out(_nasa(comfyui, base, neg, 1e-7), [[pos_t, pos_x]], noise)
    want_pos = _hidream_first_block_out(base, [[pos_t, pos_x]], noise)
    want_neg = _hidream_first_block_out(base, neg, noise)
    parts = [16, t5_tokens, 16, llama_tokens]          # the text output: [T5+; T5-; Llama+; Llama-]
    assert got[1].shape[1] == want_pos[1].shape[1] + want_neg[1].shape[1] == sum(parts) + 16 + llama_tokens
    t5p, t5n, lp, ln, bp, bn = got[1].split(parts + [16, llama_tokens], dim=1)
    scale = float(want_pos[1].abs().max())
    torch.testing.assert_close(got[0], want_pos[0], rtol=0, atol=1e-5 * float(want_pos[0].abs().max()))
    torch.testing.assert_close(torch.cat([t5p, lp, bp], 1), want_pos[1], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(torch.cat([t5n, ln, bn], 1), want_neg[1], rtol=0, atol=1e-5 * scale)
    swapped = [[t5, dict(pos_x, conditioning_llama3=pos_x["conditioning_llama3"][:, :, :llama_tokens])]]
    other = _hidream_first_block_out(_nasa(comfyui, base, swapped, 1e-7), [[pos_t, pos_x]], noise)
    assert (other[1][:, 16:16 + t5_tokens] - t5n).abs().max() > 1e-3 * scale
