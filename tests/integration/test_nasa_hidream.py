"""TrainFreeNASA on HiDream-I1 / E1 (a DIFFUSION_MODEL wrapper and an attention override, nodes/nasa_hidream.py;
the text streams after the first block: test_nasa_layers.py, the family-independent checks: test_nasa_node.py):
an edit model's image tokens, PAG's call numbering inside NASA's split in either order (core's EasyCache beside it:
test_nasa_node.py), clear refusals of a negative without HiDream's Llama features."""
import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import pag_inside_nasa_in_either_order
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny
from probes import perturbed_calls


def _pag(comfyui, model, layers="double.0, single.0", scale=2.0):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, scale, layers, 0.0, 1.0)[0]


def _conds(tiny, seed, image=None):
    (t, extra), = tiny.conditioning("hidream", seed)
    return [[t, extra if image is None else dict(extra, concat_latent_image=image)]]


def test_edit_model_image_tokens_count_as_image(comfyui, monkeypatch):
    """HiDream-E1 joins the image to edit to the latent on its width (32 image tokens for an 8x8 latent): NASA's
    split finds them, the negative moves the sample, a vanishing alpha leaves it as the plain model's, and the
    override's length check stops with a clear error when the image tokens are counted otherwise."""
    tiny = _tiny(comfyui)
    base = tiny.build("hidream")
    image = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    pos, neg, noise = _conds(tiny, 1, image), _conds(tiny, 2, image), _noise("hidream")
    plain = _sample(base, pos, pos, noise, steps=2)
    near = _sample(_nasa(comfyui, base, neg, 1e-7), pos, pos, noise, steps=2)
    torch.testing.assert_close(near, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))
    moved = _sample(_nasa(comfyui, base, neg, 0.5), pos, pos, noise, steps=2)
    assert torch.isfinite(moved).all() and (moved - plain).abs().max() > 1e-3 * plain.abs().max()
    layout = comfyui.module_of("TrainFreeNASA").nasa_hidream.dit_layout
    real = layout.hidream_image_tokens
    monkeypatch.setattr(layout, "hidream_image_tokens", lambda patch, x, image_cond=None: real(patch, x))  # edit lost
    with pytest.raises(RuntimeError, match=r"over 128 tokens where 16 image, 32 T5 and 2 x 32 Llama tokens"):
        _sample(_nasa(comfyui, base, neg, 0.5), pos, pos, noise, steps=1)


def test_pag_numbers_the_prompts_calls_inside_nasas_split_in_either_order(comfyui, monkeypatch):
    """PAG on HiDream numbers the network's attention calls; NASA turns each into three (the prompt's, and two over
    the negative it marks as its own). With both, in either order, PAG sees one call per chosen block and forward,
    over the prompt's sequence alone ([16 image; 16 T5 + 2 x 16 Llama]), not the negative's 16 + 2 x 9 tokens; at a
    vanishing alpha the pair gives PAG's own result, and at alpha 0.5 both orders give the same sample."""
    tiny = _tiny(comfyui)
    base = tiny.build("hidream")
    pos, noise = _conds(tiny, 1), _noise("hidream")
    (t, extra), = tiny.conditioning("hidream", 2)
    neg = [[t, dict(extra, conditioning_llama3=extra["conditioning_llama3"][:, :, :9])]]
    seen = perturbed_calls(comfyui, monkeypatch)
    pag_inside_nasa_in_either_order(comfyui, base, neg, pos, noise, lambda m: _pag(comfyui, m), seen,
                                    [(64, (0, 16))] * 4)


def test_a_negative_without_hidreams_llama_features_is_refused(comfyui):
    tiny = _tiny(comfyui)
    base = tiny.build("hidream")
    (t, extra), = tiny.conditioning("hidream", 2)
    with pytest.raises(ValueError, match=r"needs its Llama features \(conditioning_llama3\)"):
        _nasa(comfyui, base, [[t, {"pooled_output": extra["pooled_output"]}]])
    with pytest.raises(ValueError, match=r"Llama features \(1, 1, 16, 64\) do not fit this HiDream model"):
        _nasa(comfyui, base, [[t, dict(extra, conditioning_llama3=extra["conditioning_llama3"][:, :1])]])
    with pytest.raises(ValueError, match=r"Llama features \(1, 2, 16, 32\) do not fit"):
        _nasa(comfyui, base, [[t, dict(extra, conditioning_llama3=extra["conditioning_llama3"][..., :32])]])
    assert _nasa(comfyui, base, [[t, {}]], 0.0) is not base      # alpha 0: nothing to carry, nothing checked
