"""Start-up shared by the benchmarks: the pack as the bare package ``trainfree``, one thread, ComfyUI on CPU."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def setup(require_comfy: bool = True) -> bool:
    """Import paths for the pack, the test kit and (from COMFYUI_PATH) ComfyUI; True when ComfyUI is there."""
    torch.set_num_threads(1)
    if "trainfree" not in sys.modules:
        pkg = types.ModuleType("trainfree")
        pkg.__path__ = [str(ROOT)]
        sys.modules["trainfree"] = pkg
    sys.path.insert(0, str(ROOT / "tests"))
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        if require_comfy:
            sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
        return False
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    sys.path.insert(0, path)
    from harness import _torchvision_stand_in

    _torchvision_stand_in()
    from comfy.cli_args import args

    args.cpu = True
    return True


def wide_flux(seed: int = 0):
    """A random Flux-layout DiT wide enough to time (hidden 256, 4 double + 8 single blocks)."""
    import comfy.supported_models as sm
    from test_nodes.tiny_models import patcher

    return patcher(sm.Flux({"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64,
                            "context_in_dim": 64, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 4, "depth": 4,
                            "depth_single_blocks": 8, "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2,
                            "qkv_bias": True, "guidance_embed": True}), seed)


class EasyCacheHeld:
    """OUTER_SAMPLE wrapper reading what core EasyCache / LazyCache hold at the end of a run (before their reset):
    ``bytes`` of cached tensors and a ``note`` with the steps they skipped."""

    def __init__(self):
        self.bytes, self.note = 0, ""

    def wrapper(self, executor, *args, **kwargs):
        guider = executor.class_obj
        try:
            return executor(*args, **kwargs)
        finally:
            h = guider.model_options["transformer_options"].get("easycache")
            held = [getattr(h, n, None) for n in ("uuid_cache_diffs", "cache_diff", "x_prev_subsampled",
                                                  "output_prev_subsampled")]
            held = [v for t in held for v in (t.values() if isinstance(t, dict) else [t])]
            self.bytes = sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
            self.note = f"skipped {h.total_steps_skipped}/{len(args[3]) - 1} steps"


def rel_rmse(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ (root mean squares)."""
    return float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


class Decoder:
    """Decodes a sampler's final latent (``comfy.sample.sample``'s output, which has already been through the
    model's ``latent_format.process_out``: comfy/samplers.py ``inner_sample``) to images in [-1, 1], B×H×W×3.

    ``vae_path``: a VAE file loaded as ComfyUI's VAELoader does (``comfy.utils.load_torch_file`` +
    ``comfy.sd.VAE(sd=...)``) and decoded with ``VAE.decode``, i.e. what VAEDecode does with a KSampler's output
    (``VAE.decode`` returns [0, 1], mapped here to [-1, 1]). Without one: ComfyUI's latent preview decoder,
    ``latent_preview.Latent2RGBPreviewer`` built from the model's ``latent_rgb_factors`` / ``latent_rgb_factors_bias``,
    applied to the model-space latent (``process_in``) like the sampler preview, to every row, clamped to [-1, 1] as
    ``preview_to_image`` does but without its 8-bit rounding."""

    def __init__(self, model, vae_path=None):
        self.fmt = model.model.latent_format
        if vae_path:
            import comfy.sd
            import comfy.utils

            self.vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path))
            self.vae.throw_exception_if_invalid()
            if self.vae.latent_channels != self.fmt.latent_channels:
                sys.exit(f"--vae {vae_path}: {self.vae.latent_channels} latent channels, the benchmark model has "
                         f"{self.fmt.latent_channels}")
            self.label = f"VAE {Path(vae_path).name}"
        else:
            from latent_preview import Latent2RGBPreviewer

            self.vae = None
            self.preview = Latent2RGBPreviewer(self.fmt.latent_rgb_factors, self.fmt.latent_rgb_factors_bias)
            self.label = "latent preview RGB factors, no VAE weights here"

    @torch.inference_mode()                      # as ComfyUI's executor runs VAEDecode
    def __call__(self, latent):
        if self.vae is not None:
            return self.vae.decode(latent).float() * 2 - 1
        p = self.preview
        x = self.fmt.process_in(latent.float()).movedim(1, -1)
        return torch.nn.functional.linear(x, p.latent_rgb_factors, p.latent_rgb_factors_bias).clamp(-1, 1)

    def deviation(self, out, ref_image) -> float:
        """Relative RMSE of ``out``'s decoded image to ``ref_image`` (a decoded reference)."""
        return rel_rmse(self(out), ref_image)
