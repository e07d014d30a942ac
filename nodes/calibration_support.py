"""Where calibration files live (ComfyUI's models folder) and which model they belong to."""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch

from ..calibration import fingerprint

FOLDER = "trainfree"
_PRINTS: dict = {}


def register_folder() -> None:
    """models/trainfree/<method>/*.safetensors (extra paths via extra_model_paths.yaml: 'trainfree')."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


def method_dir(method: str) -> Path:
    register_folder()
    return Path(folder_paths.get_folder_paths(FOLDER)[0]) / method


def list_files(method: str) -> list[str]:
    register_folder()
    names = set()
    for root in folder_paths.get_folder_paths(FOLDER):
        d = Path(root) / method
        if d.is_dir():
            names.update(p.name for p in d.glob("*.safetensors"))
    return sorted(names)


def find_file(method: str, name: str) -> Path | None:
    for root in folder_paths.get_folder_paths(FOLDER):
        p = Path(root) / method / name
        if p.is_file():
            return p
    return None


def _tensors_in(obj, prefix):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            yield from _tensors_in(o, f"{prefix}.{i}")
    elif hasattr(obj, "weights"):                      # LoRA adapters of newer ComfyUI versions
        yield from _tensors_in(obj.weights, prefix + ".w")


def model_fingerprint(model_patcher) -> str:
    """Hash of the diffusion model's weights, its weight patches (LoRA ...) and its sampling type."""
    key = (id(model_patcher.model), getattr(model_patcher, "patches_uuid", None))
    if key not in _PRINTS:
        named = list(model_patcher.model.diffusion_model.state_dict().items())
        desc = [type(model_patcher.model).__name__]
        for k in sorted(model_patcher.patches):
            for j, p in enumerate(model_patcher.patches[k]):
                desc.append(f"{k}:{p[0]}:{p[2]}")
                named += list(_tensors_in(p[1], f"patch.{k}.{j}"))
        _PRINTS[key] = fingerprint(named, extra="|".join(desc))
    return _PRINTS[key]


def schedule_key(model_sampling) -> str:
    """Model sampling type and sigma range: what a calibration's lambda grid depends on."""
    names = "+".join(c.__name__ for c in type(model_sampling).__mro__[:3])
    return f"{names}:{float(model_sampling.sigma_min):.6g}-{float(model_sampling.sigma_max):.6g}"
