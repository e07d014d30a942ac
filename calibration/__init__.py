"""Calibration files: what a method measured on one model, saved with safetensors (never pickle).

Pure torch + safetensors, no ComfyUI import. A file holds named tensors and string metadata:
``trainfree.method``, ``trainfree.format`` and the *keys* it was computed for (model fingerprint,
schedule, latent shape, ...). Loading states the keys the caller has and refuses a file computed
for anything else, naming both. Writes go to a temporary name first, are flushed to the disk and
renamed into place, so an interrupted calibration (Cancel, an error, a killed process, a power cut)
never leaves a half-written file behind; temporary files of writers killed mid-save are removed by
the next save into that folder.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import torch

FORMAT = "1"
SUFFIX = ".safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEMP = re.compile(r"^\..+" + re.escape(SUFFIX) + r"\.\d+\.tmp$")     # what save() writes first
STALE_TEMP_SECONDS = 600     # a writer renames its temporary file within seconds of creating it


class CalibrationError(ValueError):
    """A calibration file is missing, unreadable, or was computed for something else."""


def file_in(root, name: str) -> Path:
    """``root/name.safetensors``, refusing names that would leave ``root`` (paths, '..', odd characters)."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if not _NAME.match(stem) or ".." in stem:
        raise CalibrationError(f"invalid calibration name {name!r}: use letters, digits, '.', '_' and '-' only "
                               "(no folders)")
    root = Path(root).resolve()
    path = (root / (stem + SUFFIX)).resolve()
    if path.parent != root:
        raise CalibrationError(f"invalid calibration name {name!r}: it leaves the calibration folder")
    return path


def fingerprint(named_tensors, extra: str = "", samples_per_tensor: int = 4096) -> str:
    """A short, stable hash of a model's weights: names, shapes, dtypes and a strided sample of
    values of every tensor (fast for multi-GB models; any real fine-tune or LoRA changes it)."""
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(flat[::step][:samples_per_tensor].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def save(path, tensors: dict, method: str, keys: dict) -> Path:
    """Write ``tensors`` with ``keys`` atomically (temporary file, flushed to the disk, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"trainfree.method": method, "trainfree.format": FORMAT}
    meta.update({f"key.{k}": str(v) for k, v in keys.items()})
    _remove_stale_temps(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        _flush(tmp)                          # on the disk before the name points at it (power cut, OS crash)
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files of writers killed mid-save (no ``finally`` runs then): untouched for
    STALE_TEMP_SECONDS, they belong to no live writer. Never fails a save."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for p in folder.glob(".*.tmp"):
        try:
            if _TEMP.match(p.name) and p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:                      # removed meanwhile, or not ours to remove
            pass


def _flush(path: Path) -> None:
    """Write ``path``'s data to the disk; where the file system cannot (some network mounts), as before."""
    with open(path, "rb+") as f:
        try:
            os.fsync(f.fileno())
        except OSError:
            pass


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; elsewhere folders cannot be opened for it)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(path, method: str, keys: dict, optional=()) -> dict:
    """Read a calibration file and check it was made by ``method`` for exactly ``keys``; a key named in
    ``optional`` is checked only when the file records it (files from before that key existed)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not a safetensors file
        raise CalibrationError(f"calibration file {path.name} is unreadable ({type(e).__name__}: {e}); "
                               "delete it and calibrate again") from e
    if meta.get("trainfree.method") != method:
        raise CalibrationError(f"{path.name} holds {meta.get('trainfree.method', 'unknown')!r} data, not {method!r}")
    if meta.get("trainfree.format") != FORMAT:
        raise CalibrationError(f"{path.name} has format {meta.get('trainfree.format')!r}; this version reads {FORMAT!r}")
    stored = {k[4:]: v for k, v in meta.items() if k.startswith("key.")}
    wrong = {k: (stored.get(k), str(v)) for k, v in keys.items()
             if stored.get(k) != str(v) and not (k in optional and k not in stored)}
    if wrong:
        detail = "; ".join(f"{k}: file has {a!r}, this run has {b!r}" for k, (a, b) in wrong.items())
        raise CalibrationError(f"{path.name} was computed for something else ({detail}); calibrate again for this "
                               "model and settings")
    return tensors


def stored_keys(path) -> dict:
    """The keys a calibration file was computed for (for listings)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # truncated or not a safetensors file
        raise CalibrationError(f"calibration file {Path(path).name} is unreadable ({type(e).__name__}: {e}); "
                               "delete it and calibrate again") from e
    return {k[4:]: v for k, v in meta.items() if k.startswith("key.")}
