"""Test set-up: the pack is imported as package ``trainfree`` without running its ComfyUI entry point."""
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

if "trainfree" not in sys.modules:  # a bare package object: pure layers import without ComfyUI
    pkg = types.ModuleType("trainfree")
    pkg.__path__ = [str(ROOT)]
    sys.modules["trainfree"] = pkg
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
