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
