"""Test-only ComfyUI nodes: a tiny random checkpoint (MODEL, CLIP, VAE) and a latent probe.

Loaded by the integration tests as a second custom-node pack, never shipped to users. The CLIP and
VAE are small stand-ins with the methods ComfyUI's own CLIPTextEncode / VAEDecode call; the MODEL
is a real ComfyUI model (see tiny_models.py).
"""
import hashlib

import torch

from . import tiny_models


class TinyClip:
    """Deterministic text -> conditioning of the shape ``arch``'s model expects."""

    def __init__(self, arch):
        self.arch = arch

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        seed = int.from_bytes(hashlib.sha256(tokens.encode()).digest()[:4], "little")
        return tiny_models.conditioning(self.arch, seed=seed)


class TinyVae:
    """Latent -> image: a fixed random colour projection, upscaled 8x (5-D video latents: one image per frame)."""

    def __init__(self, channels):
        self.proj = torch.randn(channels, 3, generator=torch.Generator().manual_seed(0)) / channels**0.5

    def decode(self, latent):
        latent = latent.float()
        if latent.ndim == 5:  # video [B, C, T, H, W] -> frames as a batch of images, like ComfyUI's video VAEs
            latent = latent.movedim(2, 1).reshape(-1, latent.shape[1], *latent.shape[-2:])
        img = torch.sigmoid(torch.einsum("bchw,cd->bhwd", latent, self.proj))
        return img.repeat_interleave(8, 1).repeat_interleave(8, 2)


class TrainFreeTestTinyCheckpoint:
    CATEGORY = "trainfree/testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"arch": (list(tiny_models.CHOICES),), "seed": ("INT", {"default": 0, "min": 0})},
                "optional": {"dtype": (["float32", "float16", "bfloat16", "float8_e4m3fn"],)}}

    def load(self, arch, seed, dtype="float32"):
        model = tiny_models.build(arch, seed, getattr(torch, dtype))
        channels = model.get_model_object("latent_format").latent_channels
        return (model, TinyClip(arch), TinyVae(channels))


class TrainFreeTestLatentStats:
    CATEGORY = "trainfree/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "stats"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def stats(self, samples):
        x = samples["samples"]
        text = f"shape={tuple(x.shape)} finite={bool(torch.isfinite(x).all())} std={float(x.float().std()):.6g}"
        raw = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(raw).hexdigest()                  # for bit-identity checks
        return {"ui": {"text": [text], "sum": [float(x.double().sum())], "sha256": [digest]}}


NODE_CLASS_MAPPINGS = {
    "TrainFreeTestTinyCheckpoint": TrainFreeTestTinyCheckpoint,
    "TrainFreeTestLatentStats": TrainFreeTestLatentStats,
}
