"""CacheQuant-scheduled block cache for DiTs (Flux, Chroma, SD3, Wan, HunyuanVideo, Qwen-Image, LTX-Video,
AuraFlow, Lumina 2, OmniGen2, HiDream, Cosmos-Predict2, PixArt): calibrate, load, patch a MODEL.

The span's blocks are replaced through ``transformer_options["patches_replace"]["dit"]`` (each replacement runs the
block's own ``original_block``, or the replacement that was there before: no forward is copied; Lumina 2, OmniGen2,
HiDream, Cosmos-Predict2 and PixArt, whose forwards call no block patches, get them from nodes/block_patches.py); a
keyed OUTER_SAMPLE wrapper gives every sampling run fresh state and clears it in a ``finally``; a keyed
CALC_COND_BATCH wrapper times full and cached evaluations for the speed-up report.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass

import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.sample
import comfy.samplers
import torch

from .. import calibration
from ..caching.cache_quant import Calibrator, SpanRun, group_bounds, uniform_schedule
from . import block_patches
from .dit_layout import dit_span
from .calibration_support import (STEP_RANGE_INPUTS, Progress, empty_latent_for, list_files, load_named, loaded_state,
                                  method_dir, model_fingerprint, prediction_key, refuse_mismatch, reuse, save,
                                  scheduler_sigmas, step_range, warn_if_other_run, written_state, wrote)
from .ui_support import compile_note, report_run

KEY = "trainfree_dit_cache"
RUN = "trainfree_dit_cache.run"
METHOD = "cache_quant"
SCHEDULE = "TRAINFREE_CACHE_SCHEDULE"
CATEGORY = "trainfree/caching"
PAPER = "Liu, Li, Gu, CacheQuant: Comprehensively Accelerated Diffusion Models (CVPR 2025)"
log = logging.getLogger("trainfree")


def check_alone(model_options: dict) -> None:
    """Refuse a second step/block cache on the same model: two caches would each reuse what the other skipped."""
    to = model_options.get("transformer_options", {})
    if "easycache" in to:
        raise ValueError("DiT block cache: this model already has ComfyUI's EasyCache or LazyCache; two caches "
                         "cannot be stacked (each would reuse results the other never computed). Use one of them.")
    if KEY in to:
        raise ValueError("DiT block cache: this model already has a TrainFree DiT cache; use a single cache node.")
    keys = {k for w in to.get("wrappers", {}).values() for k in w}
    if any(str(k).startswith("trainfree_deep_cache") for k in keys):
        raise ValueError("DiT block cache: this model already has TrainFree DeepCache; use a single cache node.")


@dataclass
class CacheSchedule:
    full: list              # 1 = full step, per step
    corr: dict              # output name -> (a [T, C], b [T, C])
    keys: dict
    name: str

    @classmethod
    def from_tensors(cls, t, keys, name):
        corr = {k[2:]: (t[k], t["b." + k[2:]]) for k in t if k.startswith("a.")}
        return cls([int(v) for v in t["full"].tolist()], corr, keys, name)

    def describe(self):
        return f"CacheQuant schedule {self.name!r} (full steps {[i for i, f in enumerate(self.full) if f]})"


class _Config:
    """What the MODEL patch carries: the span, and the schedule or uniform interval (or a calibrator)."""

    def __init__(self, arch, span, interval=3, schedule=None, node_id=None, calibrator=None):
        self.arch, self.span, self.interval, self.schedule = arch, span, interval, schedule
        self.node_id, self.calibrator, self.last_report, self.last_held = node_id, calibrator, None, 0

    def new_run(self, steps: int) -> SpanRun:
        run = self._new_run(steps)
        run.hinted = self.arch == "wan_vace"          # VACE adds its control hints after some blocks
        return run

    def _new_run(self, steps: int) -> SpanRun:
        first, last, img_first = self.span[0], self.span[-1], self.arch in ("hunyuan_video", "hidream")
        if self.calibrator is not None:
            return SpanRun(first, last, None, None, self.calibrator, img_first=img_first)
        s = self.schedule
        if s is None:
            full = [0] * steps
            for i in uniform_schedule(steps, self.interval):
                full[i] = 1
            return SpanRun(first, last, full, img_first=img_first)
        if len(s.full) != steps:
            part = s.keys.get("steps_range")
            what = f"steps {part.replace(':', '-')} of {s.keys.get('steps')} (KSamplerAdvanced)" if part else \
                f"{len(s.full)} steps"
            raise calibration.CalibrationError(
                f"DiT block cache: {s.name} was calibrated for {what}, this run has {steps} steps; calibrate for "
                f"this run's steps (CacheQuant Calibrate node; start_at_step / end_at_step for a KSamplerAdvanced "
                f"part) or sample with {len(s.full)} steps")
        return SpanRun(first, last, s.full, s.corr, img_first=img_first)


class _Replace:
    """One span block's replacement: hands the block to the run's cache (or runs it when no run is active)."""

    def __init__(self, key, prev):
        self.key, self.prev, self.extend = key, prev, None
        if callable(getattr(prev, "extend_input", None)) and callable(getattr(prev, "after_extend", None)):
            # a patch that widens the block's input (NASA on SD3 appends its negative tokens to the text stream in
            # the first joint block): widen it here, before the span takes its input, so the span's input and
            # output streams match and a cached step passes the widened stream on
            self.extend, self.prev = prev.extend_input, prev.after_extend

    def __call__(self, args, extra):
        if self.extend is not None:
            args = self.extend(args)
        prev = self.prev
        call = (lambda a: prev(a, extra)) if prev is not None else extra["original_block"]
        run = (args.get("transformer_options") or {}).get(RUN)
        return call(args) if run is None else run.block(self.key, args, call)


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    elif x.device.type == "mps":
        torch.mps.synchronize()


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    run = model_options["transformer_options"].get(RUN)
    if run is None:
        return executor(model, conds, x_in, timestep, model_options)
    run.cached_now = False
    run.controlled = run.hinted or any(isinstance(c, dict) and c.get("control") is not None
                                       for cs in conds if cs for c in cs)
    t0 = time.perf_counter()
    out = executor(model, conds, x_in, timestep, model_options)
    _sync(x_in)
    run.times.append((run.cached_now, time.perf_counter() - t0))
    return out


def report(run, what: str) -> str:
    full = [t for c, t in run.times if not c]
    cached = [t for c, t in run.times if c]
    speed = 1.0
    if full and cached:        # uncached time estimated as every evaluation at the median full-evaluation time
        speed = statistics.median(full) * len(run.times) / sum(t for _, t in run.times)
    return (f"DiT block cache ({what}): {len(full)} full and {len(cached)} cached evaluations; span blocks run "
            f"{run.blocks_run}, skipped {run.blocks_skipped}; measured speed-up {speed:.2f}x; cache held "
            f"{run.held_bytes / 2**20:.2f} MiB")


def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    to = original["transformer_options"]
    cfg: _Config = to[KEY]
    if "easycache" in to:
        raise ValueError("DiT block cache: EasyCache/LazyCache was added to this model after the TrainFree DiT "
                         "cache; two caches cannot be stacked. Use one of them.")
    run = cfg.new_run(len(args[3]) - 1)                      # refuses a schedule for another step count
    if cfg.schedule is not None:
        _refuse_other_model(cfg.schedule, guider.model_patcher)   # the model sampled: a LoRA added after counts
        warn_if_other_run(cfg.schedule.name, cfg.schedule.keys, guider, args[2], args[3])
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][RUN] = run
    done = False
    try:
        out = executor(*args, **kwargs)
        done = True
        return out
    finally:
        guider.model_options = original
        if cfg.calibrator is None:
            what = cfg.schedule.describe() if cfg.schedule else f"uniform, every {cfg.interval} steps"
            cfg.last_report = (report(run, what) + compile_note(original)
                               + ("" if done else " [run interrupted; cache freed]"))
            report_run(cfg.last_report, cfg.node_id)
        cfg.last_held = run.held_bytes
        run.clear()                                          # nothing stays held, even after an interruption


def _refuse_other_model(schedule, model_patcher):
    refuse_mismatch(f"DiT block cache: {schedule.name} was calibrated for another model", schedule.keys,
                    model_patcher, "CacheQuant Calibrate")


def apply_cache(model, cfg: _Config):
    m = model.clone()
    to = m.model_options["transformer_options"]
    to[KEY] = cfg
    dit = to.get("patches_replace", {}).get("dit", {})
    for key in cfg.span:
        m.set_model_patch_replace(_Replace(key, dit.get(key)), "dit", key[0], key[1])
    if cfg.arch in ("lumina2", "omnigen2", "hidream", "cosmos_predict2", "pixart"):   # no block patches in forward
        block_patches.install(m, model.get_model_object("diffusion_model"))
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY, _calc_cond_batch)
    return m


SPAN_INPUTS = {
    "head_blocks": ("INT", {"default": 1, "min": 0, "max": 64, "tooltip": "Blocks at the start computed at every "
                                                                          "step (not cached)."}),
    "tail_blocks": ("INT", {"default": 1, "min": 0, "max": 64, "tooltip": "Blocks at the end computed at every "
                                                                          "step (not cached)."}),
}


class TrainFreeCacheQuantCalibrate:
    DESCRIPTION = ("Calibrates a CacheQuant cache schedule for the connected DiT: samples once with every block "
                   "computed, records the cached span's residual at every step, picks the full steps by dynamic "
                   "programming (DPS) and fits the per-channel error correction of reused residuals (DEC). Saved "
                   "with safetensors under models/trainfree/cache_quant/<name>, keyed to the model and step count; "
                   f"a matching file is loaded instead. From {PAPER}.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SCHEDULE,)
    OUTPUT_TOOLTIPS = ("The cache schedule, for the DiT Block Cache node.",)
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The DiT to calibrate (Flux, Chroma, SD3, Wan, HunyuanVideo, "
                                           "Qwen-Image, LTX-Video, AuraFlow, Lumina 2, OmniGen2, HiDream, "
                                           "Cosmos-Predict2, PixArt), with its LoRAs applied."}),
            "positive": ("CONDITIONING", {"tooltip": "A typical prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (used when cfg > 1)."}),
            "latent_image": ("LATENT", {"tooltip": "Latent of the size you will generate; its batch are the "
                                                   "calibration samples."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200, "tooltip": "The step count you will sample with: "
                                                                             "the schedule belongs to it."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "CFG scale you will sample with."}),
            "sampler_name": (comfy.samplers.SAMPLER_NAMES, {"tooltip": "The sampler you will use."}),
            "scheduler": (comfy.samplers.SCHEDULER_NAMES, {"tooltip": "The scheduler you will use."}),
            "interval": ("INT", {"default": 3, "min": 1, "max": 20,
                                 "tooltip": "Mean steps per full step, N (paper: 2-5): ceil(steps / N) full steps, "
                                            "group lengths between ceil(N/2) and 2N. Larger is faster."}),
            **SPAN_INPUTS,
            "correction": ("BOOLEAN", {"default": True, "tooltip": "Fit CacheQuant's decoupled error correction "
                                                                   "(per-channel affine map of reused residuals)."}),
            "step_weighting": ("BOOLEAN", {"default": True, "tooltip": "Weight each step's reuse error by its squared "
                                                                       "step size (our refinement of the paper's "
                                                                       "objective; off = the paper's)."}),
            "name": ("STRING", {"default": "my_dit_cache", "tooltip": "File name under models/trainfree/cache_quant."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Calibrate again even if a matching file exists."}),
        }, "optional": {**STEP_RANGE_INPUTS}}

    @classmethod
    def IS_CHANGED(cls, name=None, **_):
        return written_state(METHOD, name)        # runs again when its file was deleted or replaced

    def calibrate(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, interval,
                  head_blocks, tail_blocks, correction, name, overwrite, step_weighting=True, start_at_step=0,
                  end_at_step=10000, add_noise=True):
        path = calibration.file_in(method_dir(METHOD), name)
        arch, span = dit_span(model, head_blocks, tail_blocks)
        check_alone(model.model_options)
        latent = empty_latent_for(model, latent_image)
        ms = model.get_model_object("model_sampling")          # KSampler's own step count (ddim_uniform: more)
        total = len(scheduler_sigmas(ms, scheduler, steps, sampler_name)) - 1
        first, last = step_range("CacheQuant Calibrate", start_at_step, end_at_step, total)
        run_steps = last - first
        full_steps = math.ceil(run_steps / interval)
        keys = {"model": model_fingerprint(model), "prediction": prediction_key(ms), "steps": steps, "arch": arch,
                "span": f"{head_blocks}:{tail_blocks}", "interval": interval, "correction": bool(correction),
                "weighted": bool(step_weighting), "sampler": sampler_name, "scheduler": scheduler,
                "cfg": f"{cfg:g}", "latent": "x".join(map(str, latent.shape)), "seed": seed}
        if run_steps < total or not add_noise:     # a KSamplerAdvanced part of the run (files before: whole runs)
            keys.update(steps_range=f"{first}:{last}", add_noise=bool(add_noise))
        found = reuse(path, METHOD, keys, overwrite)
        wrote(path)
        if found is not None:
            return (CacheSchedule.from_tensors(found, keys, path.name),)
        calibrator = Calibrator(run_steps, group_bounds(run_steps, full_steps)[1])
        patched = apply_cache(model, _Config(arch, span, calibrator=calibrator))
        progress = Progress(run_steps)                           # also stops at Cancel
        noise = comfy.sample.prepare_noise(latent, seed) if add_noise else torch.zeros_like(latent)
        comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                            start_step=first, last_step=last, force_full_denoise=False, callback=progress.tick,
                            disable_pbar=True, seed=seed)
        out = calibrator.solve(full_steps, bool(correction), bool(step_weighting))
        calibrator.history.clear()
        save(path, out, METHOD, keys)
        record = CacheSchedule.from_tensors(out, keys, path.name)
        log.info("trainfree: %s saved to %s", record.describe(), path)
        return (record,)


class TrainFreeCacheQuantLoad:
    DESCRIPTION = ("Loads a CacheQuant cache schedule saved by the Calibrate node (the cache node checks it belongs to "
                   "the model and the step count).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SCHEDULE,)
    OUTPUT_TOOLTIPS = ("The cache schedule, for the DiT Block Cache node.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"schedule_name": (list_files(METHOD), {"tooltip": "A file in "
                                                                               "models/trainfree/cache_quant."})}}

    @classmethod
    def IS_CHANGED(cls, schedule_name=None, **_):
        return loaded_state(METHOD, schedule_name)       # a recalibrated or replaced file is read again

    def load(self, schedule_name):
        tensors, keys, name = load_named(METHOD, schedule_name)
        return (CacheSchedule.from_tensors(tensors, keys, name),)


class TrainFreeDiTCache:
    DESCRIPTION = ("Block cache for DiTs (Flux, Chroma, SD3, Wan, HunyuanVideo, Qwen-Image, LTX-Video, AuraFlow, "
                   "Lumina 2, OmniGen2, HiDream, Cosmos-Predict2, PixArt-alpha / Sigma): at "
                   "full steps the middle blocks run and their residual (output - input) is stored; at cached steps "
                   "they are skipped and the stored residual, corrected by CacheQuant's per-channel map, is added "
                   "instead. With a schedule (Calibrate / Load node) the full steps are CacheQuant's "
                   "dynamic-programming choice; without, every interval-th step. After each run it reports the "
                   f"evaluations it cached and the measured speed-up (log and node text). From {PAPER}.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the block cache (fresh state every sampling run).",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Flux, Chroma, SD3, Wan, HunyuanVideo, Qwen-Image, LTX-Video, AuraFlow, "
                                           "Lumina 2, OmniGen2, HiDream, Cosmos-Predict2 or PixArt model."}),
            "interval": ("INT", {"default": 3, "min": 1, "max": 20, "tooltip": "Without a schedule: every N-th step "
                                                                               "is full (1 = no caching)."}),
            **SPAN_INPUTS,
        }, "optional": {
            "schedule": (SCHEDULE, {"tooltip": "A CacheQuant schedule for this model and step count (then interval "
                                               "and the block counts come from it)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def patch(self, model, interval, head_blocks, tail_blocks, schedule=None, unique_id=None):
        if schedule is not None:
            _refuse_other_model(schedule, model)
            head_blocks, tail_blocks = (int(v) for v in schedule.keys["span"].split(":"))
        arch, span = dit_span(model, head_blocks, tail_blocks)
        check_alone(model.model_options)
        return (apply_cache(model, _Config(arch, span, int(interval), schedule, unique_id)),)


NODES = {
    "TrainFreeCacheQuantCalibrate": (TrainFreeCacheQuantCalibrate, "CacheQuant Calibrate Schedule (TrainFree)"),
    "TrainFreeCacheQuantLoad": (TrainFreeCacheQuantLoad, "CacheQuant Load Schedule (TrainFree)"),
    "TrainFreeDiTCache": (TrainFreeDiTCache, "DiT Block Cache (TrainFree)"),
}
DROPDOWN = {}
