"""What the NASA tests share: the node call, cfg-1 sampling, noises, the DiT families NASA supports."""
import torch
from test_nodes import tiny_models

DITS = ("sd3", "flux", "wan", "wan_i2v", "wan_vace", "chroma", "chroma_radiance", "qwen_image", "ltxv", "hunyuan_video",
        "hunyuan_image", "auraflow", "hidream", "cosmos_predict2", "lumina2", "omnigen2")


def tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def nasa(comfyui, model, negative, alpha=0.5, start=0.0, end=1.0):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeNASA"]().patch(model, negative, alpha, start, end)[0]


def sample(model, pos, neg, noise, steps=4, cfg=1.0, seed=4):
    import comfy.sample

    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


def noise(arch, batch=1, seed=4):
    return torch.randn(tiny_models.latent_shape(arch, batch), generator=torch.Generator().manual_seed(seed))
