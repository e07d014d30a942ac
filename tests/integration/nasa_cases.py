"""What the NASA tests share: the node call, cfg-1 sampling, noises, the DiT families NASA supports."""
import torch
from test_nodes import tiny_models

DITS = ("sd3", "flux", "wan", "wan_i2v", "wan_vace", "chroma", "chroma_radiance", "qwen_image", "ltxv", "hunyuan_video",
        "hunyuan_image", "auraflow", "hidream", "cosmos_predict2", "lumina2", "omnigen2", "pixart")


def tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def nasa(comfyui, model, negative, alpha=0.5, start=0.0, end=1.0):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeNASA"]().patch(model, negative, alpha, start, end)[0]


def sample(model, pos, neg, noise, steps=4, cfg=1.0, seed=4):
    import comfy.sample

    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


def pag_inside_nasa_in_either_order(comfyui, base, neg, pos, noise_, pag, seen, want):
    """PAG (``pag(model)``) and NASA in either order, NASA at a vanishing alpha and at 0.5: PAG perturbs the calls
    ``want`` (``seen``: probes.perturbed_calls) whatever the order, the pair gives PAG's own result at the vanishing
    alpha, moves away from it at 0.5, and both orders then give the same sample."""
    pag_alone = sample(pag(base), pos, pos, noise_, steps=2)
    assert seen == want
    results = {}
    for order in ("nasa first", "pag first"):
        for alpha in (1e-7, 0.5):
            seen.clear()
            model = pag(nasa(comfyui, base, neg, alpha)) if order == "nasa first" else nasa(comfyui, pag(base), neg,
                                                                                            alpha)
            results[order, alpha] = sample(model, pos, pos, noise_, steps=2)
            assert seen == want, (order, alpha)
        scale = float(pag_alone.abs().max())
        torch.testing.assert_close(results[order, 1e-7], pag_alone, rtol=0, atol=1e-5 * scale)
        assert (results[order, 0.5] - pag_alone).abs().max() > 1e-3 * scale
    torch.testing.assert_close(results["nasa first", 0.5], results["pag first", 0.5], rtol=0, atol=1e-6)


def noise(arch, batch=1, seed=4):
    return torch.randn(tiny_models.latent_shape(arch, batch), generator=torch.Generator().manual_seed(seed))
