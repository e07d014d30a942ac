"""Edit models: Flux Kontext and Qwen-Image Edit append the reference image's latent tokens to the image stream
(conditioning ``reference_latents``) and are sampled at cfg 1. NASA, PAG and the DiT cache count those tokens as
image tokens, as the model does: exactness where the patch must change nothing, NASA's streams equal to each
prompt's own forward with the reference, and the cache's interval-1 run bit-identical."""
import pytest
import torch
from probes import first_block_streams
from test_nodes import tiny_models

EDIT = ["flux", "qwen_image"]


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _node(comfyui, name):
    return comfyui.nodes.NODE_CLASS_MAPPINGS[name]()


def _edit_cond(tiny, arch, seed):
    """A prompt with one reference latent (another 8x8 image), as ReferenceLatent / TextEncodeQwenImageEdit make."""
    text, extra = tiny.conditioning(arch, seed)[0]
    ref = torch.randn(tiny_models.latent_shape(arch, 1), generator=torch.Generator().manual_seed(99))
    return [[text, dict(extra, reference_latents=[ref])]]


def _sample(model, cond, noise, steps=3):
    import comfy.sample

    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, torch.zeros_like(noise),
                               seed=4, disable_pbar=True)


def _noise(arch):
    return torch.randn(tiny_models.latent_shape(arch, 1), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("arch", EDIT)
def test_the_reference_reaches_the_model(comfyui, arch):
    """The premise: the reference latent changes the sample (else nothing below would test it)."""
    tiny, base, noise, pos = _setup(comfyui, arch)
    assert (_sample(base, pos, noise) - _sample(base, tiny.conditioning(arch, 1), noise)).abs().max() > 1e-3


def _setup(comfyui, arch):
    """(tiny kit, model, noise, a prompt with a reference latent)."""
    tiny = _tiny(comfyui)
    return tiny, tiny.build(arch), _noise(arch), _edit_cond(tiny, arch, 1)


def _streams(model, cond, noise):
    m, seen = first_block_streams(model)
    _sample(m, cond, noise, steps=1)
    return seen[0]


@pytest.mark.parametrize("arch", EDIT)
def test_nasa_streams_with_a_reference_equal_each_prompts_own_forward(comfyui, arch):
    tiny, base, noise, pos = _setup(comfyui, arch)
    neg = [[tiny.conditioning(arch, 2)[0][0][:, :9], dict(pos[0][1])]]
    nasa = _node(comfyui, "TrainFreeNASA")
    got = _streams(nasa.patch(base, neg, 1e-7, 0.0, 1.0)[0], pos, noise)
    want_pos, want_neg = _streams(base, pos, noise), _streams(base, neg, noise)
    assert got["img"].shape[1] == 2 * 16                          # the image's 16 tokens and the reference's 16
    scale = float(want_pos["txt"].abs().max())
    torch.testing.assert_close(got["txt"][:, :16], want_pos["txt"], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got["txt"][:, 16:], want_neg["txt"], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got["img"], want_pos["img"], rtol=0, atol=1e-5 * float(want_pos["img"].abs().max()))
    assert torch.equal(_sample(nasa.patch(base, neg, 0.0, 0.0, 1.0)[0], pos, noise), _sample(base, pos, noise))
    steered = _sample(nasa.patch(base, neg, 0.5, 0.0, 1.0)[0], pos, noise)
    assert torch.isfinite(steered).all() and (steered - _sample(base, pos, noise)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", EDIT)
def test_pag_and_the_dit_cache_with_a_reference(comfyui, arch):
    _, base, noise, pos = _setup(comfyui, arch)
    plain = _sample(base, pos, noise, steps=6)
    pag = _node(comfyui, "TrainFreePAG")
    assert torch.equal(_sample(pag.patch(base, 0.0, "", 0.0, 1.0)[0], pos, noise, steps=6), plain)
    guided = _sample(pag.patch(base, 3.0, "", 0.0, 1.0)[0], pos, noise, steps=6)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4
    cache = _node(comfyui, "TrainFreeDiTCache")
    assert torch.equal(_sample(cache.patch(base, 1, 1, 1)[0], pos, noise, steps=6), plain)
    cached = _sample(cache.patch(base, 3, 1, 1)[0], pos, noise, steps=6)
    rel = float((cached - plain).norm() / plain.norm())
    assert 0 < rel < 0.05, rel
