"""Where calibration files live (ComfyUI's models folder) and which model they belong to."""
from __future__ import annotations

import logging
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
from .ui_support import announce_written

FOLDER = "trainfree"
log = logging.getLogger("trainfree")
FINGERPRINT_CACHE = 64        # fingerprints remembered (~0.3 KiB each with the key), the oldest dropped first
_PRINTS: dict = {}            # (id(model), patches uuid) -> fingerprint; strings only, never a model reference


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


def _original_weights(model_patcher) -> list:
    """The diffusion model's weights as loaded from disk. ComfyUI bakes weight patches (LoRA ...) into
    the shared model in place while a patched clone is loaded, keeping the originals in the patcher's
    ``backup``; hashing the live tensors would give the base model (and the LoRA'd one) another print
    while any LoRA is applied."""
    backup = getattr(model_patcher, "backup", {}) or {}
    hooked = getattr(model_patcher, "hook_backup", {}) or {}          # weights patched by hook LoRAs: (weight, device)
    named = []
    for k, t in model_patcher.model.diffusion_model.state_dict().items():
        bk, hk = backup.get("diffusion_model." + k), hooked.get("diffusion_model." + k)
        named.append((k, bk.weight if bk is not None else hk[0] if hk is not None else t))
    return named


def model_fingerprint(model_patcher) -> str:
    """Hash of the diffusion model's weights, its weight patches (LoRA ...) and its model class."""
    key = (id(model_patcher.model), getattr(model_patcher, "patches_uuid", None))
    if key not in _PRINTS:
        named = _original_weights(model_patcher)
        desc = [type(model_patcher.model).__name__]
        for k in sorted(model_patcher.patches):
            for j, p in enumerate(model_patcher.patches[k]):
                desc.append(f"{k}:{p[0]}:{p[2]}")
                named += list(_tensors_in(p[1], f"patch.{k}.{j}"))
        while len(_PRINTS) >= FINGERPRINT_CACHE:
            del _PRINTS[next(iter(_PRINTS))]
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


class _Interruptible:
    """A sampler's model that honours Cancel before every call (long calibration solves report no steps)."""

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def interruptible(model):
    return _Interruptible(model)


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


def prediction_key(model_sampling) -> str:
    """What the network predicts (EPS, V_PREDICTION, CONST, X0 ...): ComfyUI's ModelSamplingDiscrete node mixes
    these into one class whose first bases do not show it, and the weights alone do not tell it either."""
    kinds = [c.__name__ for c in type(model_sampling).__mro__
             if c.__module__ == "comfy.model_sampling" and not c.__name__.startswith("ModelSampling")]
    return "+".join(kinds) or type(model_sampling).__name__


def model_keys(model_patcher) -> dict:
    """The keys every calibration records about its model: weights (with LoRAs), schedule, prediction type."""
    ms = model_patcher.get_model_object("model_sampling")
    return {"model": model_fingerprint(model_patcher), "schedule": schedule_key(ms), "prediction": prediction_key(ms)}


OPTIONAL = ("settings", "prediction")   # keys files from before 2026-12 do not record; checked when they do


def mismatch(keys: dict, model_patcher) -> str:
    """'' when a calibration's keys fit this model, else what differs (named for the message). Only what the
    calibration recorded is compared (older files lack the prediction type; CacheQuant's the schedule)."""
    have = model_keys(model_patcher)
    wrong = {k: (keys[k], v) for k, v in have.items() if k in keys and str(keys[k]) != v}
    return "; ".join(f"{k}: calibrated for {a!r}, this model {b!r}" for k, (a, b) in wrong.items())


def refuse_mismatch(what: str, keys: dict, model_patcher, calibrate_node: str) -> None:
    """Raise ``what (details); calibrate this model with ...`` when a calibration does not fit this model."""
    detail = mismatch(keys, model_patcher)
    if detail:
        raise CalibrationError(f"{what} ({detail}); calibrate this model with the {calibrate_node} node")


def check_matches(name: str, keys: dict, model_k, calibrate_node: str) -> None:
    """Refuse a calibration made for another model or schedule than the one sampling now."""
    refuse_mismatch(f"{name} was computed for another model or schedule", keys, model_k.inner_model.model_patcher,
                    calibrate_node)


def reuse(path, method: str, keys: dict, overwrite: bool):
    """The tensors of an existing calibration made for exactly ``keys`` (None: compute anew)."""
    if overwrite or not path.exists():
        return None
    try:
        tensors = calibration.load(path, method, keys, optional=OPTIONAL)
    except CalibrationError as e:
        raise CalibrationError(f"{e}. Choose another name, or set overwrite to replace it.") from e
    if "settings" in keys and "settings" not in calibration.stored_keys(path):
        log.info("trainfree: reusing %s, made before calibration settings were recorded (set overwrite to redo it "
                 "with these settings)", path.name)
    else:
        log.info("trainfree: reusing %s, calibrated for this model and these settings (set overwrite to redo it)",
                 path.name)
    return tensors


def settings_key(**settings) -> str:
    """The calibration settings a result depends on, as one key: changing any of them recalibrates."""
    return ";".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def guider_cfg(guider):
    """The CFG scale of a guider (a sampler's ``model.inner_model``), or None when it has no single one."""
    cfg = getattr(guider, "cfg", None)
    return float(cfg) if isinstance(cfg, (int, float)) else None


def warn_if_other(name: str, keys: dict, key: str, have, what: str) -> None:
    """Log when sampling runs with another ``key`` than the calibration was made for (allowed, less exact)."""
    if key in keys and have is not None and keys[key] != str(have):
        log.warning("trainfree: %s was calibrated for %s %s; this run uses %s, where it fits less well "
                    "(calibrate for this %s too)", name, what, keys[key], have, what)


def file_state(path) -> str:
    """A cheap token that changes when the file at ``path`` is written, replaced or removed ("missing": none)."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return "missing"
    return f"{path}:{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"


def loaded_state(method: str, name) -> str:
    """IS_CHANGED of a Load node: the state of the file it reads, so a recalibrated or replaced file is read again.
    Never raises: a missing or invalid name reaches the node itself, which says what is wrong."""
    try:
        return file_state(find_file(method, calibration.file_in(method_dir(method), name).name))
    except Exception:   # ComfyUI would only log it and rerun the node every time
        return "missing"


_WRITTEN: dict = {}     # calibration file -> (its state when last seen or written by a writer node, generation)


def written_state(method: str, name) -> str:
    """IS_CHANGED of a node that writes (and reuses) a calibration file: a generation that changes only when the
    file was deleted or replaced since a writer node last ran or looked, so an unchanged file keeps the node's
    cached output, a deleted one is computed again and a replaced one read again. Never raises."""
    try:
        path = str(calibration.file_in(method_dir(method), name))
    except Exception:   # an invalid name: the node itself says so
        return "invalid"
    now = file_state(path)
    seen, generation = _WRITTEN.get(path, (now, 0))
    if seen != now:
        generation += 1
    _WRITTEN[path] = (now, generation)
    return f"{path}#{generation}"


def wrote(path) -> None:
    """Record the file state a writer node leaves behind: its own write (or reuse) does not make it run again."""
    key = str(path)
    _WRITTEN[key] = (file_state(key), _WRITTEN.get(key, (None, 0))[1])


def save(path: Path, tensors: dict, method: str, keys: dict) -> None:
    """What a writer node does with a new calibration: save it atomically (``calibration.save``), remember the
    file's state (``wrote``) and tell the editors, whose Load nodes then list it (``announce_written``)."""
    calibration.save(path, tensors, method, keys)
    wrote(path)
    announce_written(path)


def load_named(method: str, name: str):
    """(tensors, keys, file name) of a saved calibration picked by name in a Load node."""
    path = find_file(method, calibration.file_in(method_dir(method), name).name)
    if path is None:
        raise CalibrationError(f"calibration file not found: {name}")
    keys = calibration.stored_keys(path)
    return calibration.load(path, method, keys), keys, path.name


def _name(fn):
    return getattr(fn, "__name__", None) or type(fn).__name__


def _sampler_differs(calibrated: str, sampler) -> bool:
    fn = getattr(sampler, "sampler_function", None)
    if fn is None or calibrated not in comfy.samplers.SAMPLER_NAMES:
        return False
    other = getattr(comfy.samplers.sampler_object(calibrated), "sampler_function", None)
    return other is not None and _name(other) != _name(fn)


def scheduler_sigmas(ms, scheduler: str, steps: int, sampler_name=None):
    """The sigmas KSampler samples for ``steps`` steps (penultimate sigma dropped for uni_pc / dpm_2, and
    ddim_uniform's extra steps kept, exactly as KSampler does)."""
    if sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sig = comfy.samplers.calculate_sigmas(ms, scheduler, steps + 1)
        return torch.cat([sig[:-2], sig[-1:]])
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps)


def basic_scheduler_sigmas(ms, scheduler: str, steps: int):
    """The sigmas ComfyUI's BasicScheduler node gives (the last steps + 1 values, denoise 1)."""
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps)[-(steps + 1):]


def _same(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a.to(b), b, rtol=1e-3, atol=1e-5)


def _sigmas_note(ms, scheduler, sigmas, sampler_name, keys=None):
    """None when ``sigmas`` are the calibrated scheduler's (through KSampler or BasicScheduler), else a hint. A
    calibration of a KSamplerAdvanced step range (``keys["steps_range"]``) expects that part of the steps, the last
    sigma with its leftover noise or 0."""
    if keys and keys.get("steps_range"):
        first, last = (int(v) for v in str(keys["steps_range"]).split(":"))
        part = scheduler_sigmas(ms, scheduler, int(keys["steps"]), sampler_name)[first:last + 1]
        if _same(part, sigmas) or _same(torch.cat([part[:-1], part.new_zeros(1)]), sigmas):
            return None
        return f"calibrated for steps {first}-{last} of {keys['steps']}; another step range, denoise or custom SIGMAS"
    n = len(sigmas) - 1
    counts = [k for k in (n - 1, n, n + 1) if k >= 1]
    dropped = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS

    def plain(k):
        return _same(scheduler_sigmas(ms, scheduler, k), sigmas) or _same(basic_scheduler_sigmas(ms, scheduler, k),
                                                                          sigmas)

    def without_penultimate(k):
        return _same(scheduler_sigmas(ms, scheduler, k, "uni_pc"), sigmas)

    if any((without_penultimate if dropped else plain)(k) for k in counts):
        return None
    if any((plain if dropped else without_penultimate)(k) for k in counts):
        return ("KSampler drops the penultimate sigma for uni_pc / dpm_2 samplers, BasicScheduler does not, and the "
                "calibration and this run differ in that")
    return "another scheduler, denoise < 1 or custom SIGMAS"


# optional inputs of the calibrations that fit one KSamplerAdvanced's part of the steps (two-model runs)
STEP_RANGE_INPUTS = {
    "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "As KSamplerAdvanced: the first step "
                              "this model samples, for two-model runs (Wan 2.2's high- and low-noise experts, a "
                              "refiner). The calibration then fits that KSamplerAdvanced's steps only."}),
    "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000, "tooltip": "As KSamplerAdvanced: the step this "
                            "model stops at (10000: the last). Calibrated with leftover noise, as a first expert "
                            "hands it on."}),
    "add_noise": ("BOOLEAN", {"default": True, "tooltip": "As KSamplerAdvanced's add_noise: off for a second expert, "
                              "whose latent_image is then the first expert's output."}),
}


def step_range(what: str, start_at_step, end_at_step, total: int) -> tuple[int, int]:
    """(first, last) step of a KSamplerAdvanced part of a ``total``-step run, or a ValueError."""
    first, last = int(start_at_step), min(int(end_at_step), total)
    if first >= last:
        raise ValueError(f"{what}: start_at_step ({start_at_step}) must be below end_at_step ({end_at_step}) and "
                         f"the run's {total} steps")
    return first, last


def warn_if_other_run(name: str, keys: dict, guider, sampler=None, sigmas=None) -> None:
    """Log each setting of this sampling run (CFG, sampler, scheduler's sigmas) that differs from the ones the
    calibration ``keys`` were made for: allowed, but the calibration fits them less well. Never raises."""
    try:
        cfg = guider_cfg(guider)
        warn_if_other(name, keys, "cfg", None if cfg is None else f"{cfg:g}", "CFG")
        if sampler is not None and "sampler" in keys and _sampler_differs(keys["sampler"], sampler):
            log.warning("trainfree: %s was calibrated with the %r sampler; this run uses another one (%s), where it "
                        "fits less well", name, keys["sampler"], _name(sampler.sampler_function))
        scheduler = keys.get("scheduler")
        if sigmas is None or len(sigmas) < 2 or scheduler not in comfy.samplers.SCHEDULER_NAMES:
            return
        ms = guider.model_patcher.get_model_object("model_sampling")
        note = _sigmas_note(ms, scheduler, sigmas.detach().cpu(), keys.get("sampler"), keys)
        if note:
            log.warning("trainfree: %s was calibrated for the %r scheduler's sigmas; these sigmas differ (%s), so it "
                        "may fit them less well", name, scheduler, note)
    except Exception as e:  # a warning must never stop a run
        log.debug("trainfree: could not compare this run's settings with %s: %s", name, e)
