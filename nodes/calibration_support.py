"""Where calibration files live (ComfyUI's models folder) and which model they belong to."""
from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch

from .. import calibration
from ..calibration import CalibrationError, fingerprint

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


def with_guided_model(model, positive, negative, cfg, latent, seed, work):
    """Run ``work(model_k, x, extra_args)`` inside a real ComfyUI sampling call, where ``model_k`` is
    the guided denoiser samplers get (conds processed, patches and wrappers active); returns its result."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    out = {}

    def run(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        out["result"] = work(model_k, x, extra_args or {})
        return x

    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 1)
    guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(run), sig, disable_pbar=True, seed=seed)
    return out["result"]


class Progress:
    """ComfyUI's progress bar for a calibration; checks Cancel at every tick."""

    def __init__(self, total):
        self.total, self.done = max(1, int(total)), 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def tick(self, *_):
        self.done += 1
        self.bar.update_absolute(min(self.done, self.total), self.total)
        comfy.model_management.throw_exception_if_processing_interrupted()


def empty_latent_for(model, latent_image):
    return comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])


def check_matches(name: str, keys: dict, model_k, calibrate_node: str) -> None:
    """Refuse a calibration made for another model or schedule than the one sampling now."""
    have = {"model": model_fingerprint(model_k.inner_model.model_patcher),
            "schedule": schedule_key(model_k.inner_model.inner_model.model_sampling)}
    wrong = {k: (keys.get(k), v) for k, v in have.items() if keys.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: calibrated for {a!r}, this model {b!r}" for k, (a, b) in wrong.items())
        raise CalibrationError(f"{name} was computed for another model or schedule ({detail}); "
                               f"calibrate this model with the {calibrate_node} node")


def reuse(path, method: str, keys: dict, overwrite: bool):
    """The tensors of an existing calibration made for exactly ``keys`` (None: compute anew)."""
    if overwrite or not path.exists():
        return None
    try:
        return calibration.load(path, method, keys)
    except CalibrationError as e:
        raise CalibrationError(f"{e}. Choose another name, or set overwrite to replace it.") from e


def load_named(method: str, name: str):
    """(tensors, keys, file name) of a saved calibration picked by name in a Load node."""
    path = find_file(method, calibration.file_in(method_dir(method), name).name)
    if path is None:
        raise CalibrationError(f"calibration file not found: {name}")
    keys = calibration.stored_keys(path)
    return calibration.load(path, method, keys), keys, path.name
