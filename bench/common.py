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
