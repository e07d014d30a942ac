"""LinearAG nodes: calibrate per-step regression coefficients for a model, load them, patch a MODEL."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.sample
import comfy.samplers
import torch

from .. import calibration
from ..calibration import CalibrationError
from ..guidance.linear_ag import Calibrator, LinearAG, estimated_steps
from ..samplers.common import STEP_SIGMA
from .calibration_support import (STEP_RANGE_INPUTS, Progress, empty_latent_for, list_files, load_named, loaded_state,
                                  method_dir, model_keys, refuse_mismatch, reuse, save, scheduler_sigmas, settings_key,
                                  step_range, warn_if_other_run, written_state, wrote)
from .cond_layout import other_guider, other_guider_text
from .ui_support import report_run, ui_text

METHOD = "linear_ag"
TYPE = "TRAINFREE_LINEAR_AG"
KEY = "trainfree_linear_ag"
PAPER = "Castillo et al., Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models (AAAI 2025)"
log = logging.getLogger("trainfree")


@dataclass
class LinearAGRecord:
    coef: torch.Tensor      # (steps, 1 + 2 * history)
    r2: torch.Tensor        # (steps,)
    sigmas: torch.Tensor    # (steps + 1,) the calibrated schedule
    keys: dict
    name: str

    @property
    def history(self) -> int:
        return (self.coef.shape[1] - 1) // 2

    @property
    def steps(self) -> int:
        return self.coef.shape[0]


def _record(tensors, keys, name):
    return LinearAGRecord(tensors["coef"], tensors["r2"], tensors["sigmas"], {k: str(v) for k, v in keys.items()}, name)


def step_of(timestep, sigmas, named=None) -> int | None:
    """Index of the schedule step whose sigma this evaluation is at (None: a solver's intermediate stage);
    ``named``: the step sigma a sampler calling at a shifted sigma publishes (STEP_SIGMA)."""
    if sigmas is None:
        return None
    t = float(timestep.reshape(-1)[0]) if named is None else float(named)
    hits = (sigmas[:-1].detach().to("cpu", torch.float64) - t).abs() <= 1e-5 * max(1.0, abs(t))
    idx = hits.nonzero().flatten()
    return int(idx[0]) if idx.numel() else None


def _eps(x, d, sigma):
    return (x - d) / sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# -- calibration -----------------------------------------------------------------------------------
def _recorder(calibrator, seen):
    def wrapper(executor, model, conds, x_in, timestep, model_options):
        out = executor(model, conds, x_in, timestep, model_options)
        to = model_options["transformer_options"]
        step = step_of(timestep, to.get("sample_sigmas"), to.get(STEP_SIGMA))
        if step is not None and step not in seen and len(conds) > 1 and conds[1] is not None:
            seen.add(step)
            calibrator.add(step, _eps(x_in, out[0], timestep), _eps(x_in, out[1], timestep))
        return out
    return wrapper


class TrainFreeLinearAGCalibrate:
    DESCRIPTION = ("LinearAG calibration: samples the latent's batch of trajectories with plain CFG and fits, per "
                   "step, the linear map that predicts the unconditional estimate from the conditional one and the "
                   "previous step's estimates (ordinary least squares). Saved under "
                   f"models/trainfree/linear_ag/<name>, keyed to the model and the schedule. From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = (TYPE,)
    OUTPUT_TOOLTIPS = ("LinearAG coefficients for the LinearAG node.",)
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to calibrate (with its LoRAs and patches applied)."}),
            "positive": ("CONDITIONING", {"tooltip": "Typical prompts (one per latent, or one for all)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt you sample with."}),
            "latent_image": ("LATENT", {"tooltip": "Latent size; its batch size is the number of calibration "
                                                   "trajectories (paper: ~200; 8-32 are enough for scalar "
                                                   "coefficients)."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200, "tooltip": "The step count you will sample "
                                                                             "with: coefficients belong to it."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The CFG scale you will sample with."}),
            "sampler_name": (comfy.samplers.SAMPLER_NAMES, {"tooltip": "The sampler you will sample with."}),
            "scheduler": (comfy.samplers.SCHEDULER_NAMES, {"tooltip": "The scheduler you will sample with: the "
                                                                      "coefficients belong to its sigmas."}),
            "history": ("INT", {"default": 2, "min": 1, "max": 4,
                                "tooltip": "Past steps used as regressors: 1 is exact for Gaussian data, 2 fits "
                                           "mixtures ten times better in the measured case. Replacements start "
                                           "at step 'history'."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed of the "
                                                                                           "trajectories."}),
            "name": ("STRING", {"default": "my_model_linear_ag", "tooltip": "File name under "
                                                                            "models/trainfree/linear_ag."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Calibrate again even if a matching file "
                                                                   "exists."}),
        }, "optional": {**STEP_RANGE_INPUTS}, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, name=None, **_):
        return written_state(METHOD, name)        # runs again when its file was deleted or replaced

    def calibrate(self, model, positive, negative, latent_image, steps, cfg, sampler_name, scheduler, history, seed,
                  name, overwrite, unique_id=None, start_at_step=0, end_at_step=10000, add_noise=True):
        path = calibration.file_in(method_dir(METHOD), name)
        ms = model.get_model_object("model_sampling")
        sigmas = scheduler_sigmas(ms, scheduler, steps, sampler_name).to(torch.float64)   # as KSampler samples
        first, last = step_range("LinearAG Calibrate", start_at_step, end_at_step, len(sigmas) - 1)
        partial = last - first < len(sigmas) - 1 or not add_noise
        sigmas = sigmas[first:last + 1]
        if len(sigmas) - 1 <= int(history):
            raise ValueError(f"LinearAG: {len(sigmas) - 1} steps leave no step with {history} earlier ones to fit; "
                             "use more steps or a smaller history")
        if float(cfg) <= 1.0 and not sampler_name.endswith("_cfg_pp"):      # CFG++ samplers keep the pass
            raise ValueError("LinearAG replaces CFG's negative-prompt pass; at CFG 1 ComfyUI skips that pass, so "
                             "there is nothing to calibrate. Set the CFG you sample with (> 1).")
        latent = empty_latent_for(model, latent_image)
        keys = {**model_keys(model), "scheduler": scheduler,
                "steps": int(steps), "history": int(history), "cfg": f"{float(cfg):g}", "sampler": sampler_name,
                "settings": settings_key(seed=seed, latent="x".join(map(str, latent.shape)))}
        if partial:                                  # a KSamplerAdvanced part of the run (files before: whole runs)
            keys.update(steps_range=f"{first}:{last}", add_noise=bool(add_noise))
        cached = reuse(path, METHOD, keys, overwrite)
        wrote(path)
        if cached is not None:
            return (_record(cached, keys, path.name),)
        calibrator, seen = Calibrator(len(sigmas) - 1, history), set()    # ddim_uniform: KSampler runs more steps
        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY + "_calibrate", _recorder(calibrator, seen))
        noise = comfy.sample.prepare_noise(latent, seed) if add_noise else torch.zeros_like(latent)
        progress = Progress(len(sigmas) - 1)
        comfy.sample.sample(m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, seed=seed,
                            start_step=first, last_step=last, force_full_denoise=False,
                            callback=lambda *a: progress.tick(), disable_pbar=True)
        coef, r2 = calibrator.solve()
        if not bool((r2 == r2).any()):
            raise ValueError("LinearAG: no step could be fitted (the sampler made no negative-prompt evaluations "
                             f"at the calibrated steps); nothing saved to {path.name}")
        tensors = {"coef": coef, "r2": r2, "sigmas": sigmas}
        save(path, tensors, METHOD, keys)
        log.info("trainfree: LinearAG coefficients saved to %s (R^2 per step: %s)", path,
                 ", ".join("-" if v != v else f"{v:.4f}" for v in r2.tolist()))
        fitted = r2[r2 == r2]
        if fitted.numel():
            ui_text(f"LinearAG: fitted {fitted.numel()} steps, R² {float(fitted.min()):.5f} (worst) to "
                    f"{float(fitted.max()):.5f}; saved as {path.name}", unique_id)
        return (_record(tensors, keys, path.name),)


class TrainFreeLinearAGLoad:
    DESCRIPTION = "Loads LinearAG coefficients saved by the calibration node (checked against the model)."
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = (TYPE,)
    OUTPUT_TOOLTIPS = ("LinearAG coefficients for the LinearAG node.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"coefficients_name": (list_files(METHOD), {"tooltip": "A file in "
                                                                                    "models/trainfree/linear_ag."})}}

    @classmethod
    def IS_CHANGED(cls, coefficients_name=None, **_):
        return loaded_state(METHOD, coefficients_name)       # a recalibrated or replaced file is read again

    def load(self, coefficients_name):
        tensors, keys, name = load_named(METHOD, coefficients_name)
        return (_record(tensors, keys, name),)


# -- sampling --------------------------------------------------------------------------------------
class _Holder:
    def __init__(self, record, start, end, node_id=None):
        self.record, self.start, self.end, self.state, self.seen = record, start, end, None, set()
        self.node_id, self.other = node_id, 0


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    to = model_options["transformer_options"]
    holder = to.get(KEY)
    if (holder is None or holder.state is None or other_guider(holder, conds) or len(conds) < 2 or conds[1] is None
            or conds[0] is None):
        return executor(model, conds, x_in, timestep, model_options)     # cfg 1, or a sliced call of another patch
    lin, batch = holder.state, x_in.shape[0]
    step = step_of(timestep, to.get("sample_sigmas"), to.get(STEP_SIGMA))
    fresh = step is not None and step not in holder.seen
    if fresh:
        holder.seen.add(step)
    if fresh and lin.can_estimate(step, batch):
        out = executor(model, [conds[0], None] + list(conds[2:]), x_in, timestep, model_options)
        eps_c = _eps(x_in, out[0], timestep)
        eps_u = lin.estimate(step, eps_c)
        lin.record(step, eps_c, eps_u)
        lin.count(0, batch)
        return [out[0], x_in - eps_u * timestep.reshape(-1, *([1] * (x_in.ndim - 1))).to(x_in.dtype)] + list(out[2:])
    out = executor(model, conds, x_in, timestep, model_options)
    lin.count(batch, batch)
    if fresh:
        lin.record(step, _eps(x_in, out[0], timestep), _eps(x_in, out[1], timestep))
    return out


def _refuse_other_model(rec, model_patcher):
    refuse_mismatch(f"LinearAG coefficients {rec.name} belong to another model", rec.keys, model_patcher,
                    "LinearAG Calibrate")


def _outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    proto = original["transformer_options"][KEY]
    rec = proto.record
    _refuse_other_model(rec, guider.model_patcher)       # the model sampled: a LoRA added after the node counts
    run = sigmas.detach().to("cpu", torch.float64)
    want = rec.sigmas.to(torch.float64)
    if rec.keys.get("steps_range") and run.shape[-1] > 1 and float(run[-1]) == 0:   # leftover noise disabled
        want = torch.cat([want[:-1], want.new_zeros(1)])
    same = run.shape[-1] == want.shape[-1] and torch.allclose(run, want, rtol=1e-4, atol=1e-6)
    if not same:
        part = rec.keys.get("steps_range")
        part = f" (steps {part.replace(':', '-')} of {rec.keys['steps']}, KSamplerAdvanced)" if part else ""
        raise CalibrationError(
            f"LinearAG coefficients {rec.name} were calibrated for {rec.steps} steps{part} of the "
            f"{rec.keys.get('scheduler', '?')!r} scheduler (sigmas {float(rec.sigmas[0]):.4g} ... "
            f"{float(rec.sigmas[-2]):.4g}); this run samples {sigmas.shape[-1] - 1} steps (sigmas "
            f"{float(sigmas[0]):.4g} ... {float(sigmas[-2]) if sigmas.shape[-1] > 1 else 0:.4g}). Sample with the "
            "calibrated steps, scheduler and denoise 1, or calibrate for this schedule")
    warn_if_other_run(rec.name, {k: rec.keys[k] for k in ("cfg", "sampler") if k in rec.keys}, guider, sampler)
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    holder = _Holder(rec, proto.start, proto.end, proto.node_id)
    holder.state = LinearAG(rec.coef, estimated_steps(rec.steps, proto.start, proto.end, rec.history), rec.history)
    guider.model_options["transformer_options"][KEY] = holder
    finished = False
    try:
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finished = True
        return out
    finally:
        lin = holder.state
        if holder.other and not lin.total and finished:
            report_run(other_guider_text("LinearAG", holder), holder.node_id)
        elif not lin.total and finished:         # not after a cancelled or failed run
            log.info("trainfree: LinearAG inactive: this run made no negative-prompt evaluations (CFG 1)")
            ui_text("LinearAG: inactive (CFG 1 has no negative-prompt pass to replace)", holder.node_id)
        elif lin.total:
            cut = "" if finished else " [run interrupted]"
            log.info("trainfree: LinearAG replaced %d of %d unconditional evaluations (%.0f%%)%s", lin.saved,
                     lin.total, 100.0 * lin.saved / lin.total, cut)
            ui_text(f"LinearAG: {lin.saved} of {lin.total} negative-prompt evaluations replaced "
                    f"({100.0 * lin.saved / lin.total:.0f}%){cut}", holder.node_id)
        guider.model_options = original


class TrainFreeLinearAG:
    DESCRIPTION = ("LinearAG: in the scheduled part of sampling (default: the first half), every other step's "
                   "unconditional evaluation is replaced by the calibrated linear combination of the conditional "
                   "estimate and the previous step's estimates, saving those network calls. Chain with the "
                   "Adaptive Guidance node to also save the second half. Logs the evaluations saved. "
                   f"From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with LinearAG; sample it with the calibrated steps, scheduler and CFG > 1.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch: the one the coefficients were calibrated on."}),
            "coefficients": (TYPE, {"tooltip": "From the LinearAG Calibrate or Load node."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Where in sampling replacements start (fraction of steps)."}),
            "end_percent": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Where they end (paper: the first half, 0.5)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def patch(self, model, coefficients, start_percent, end_percent, unique_id=None):
        if start_percent > end_percent:
            raise ValueError(f"LinearAG: start_percent {start_percent} is after end_percent {end_percent}")
        _refuse_other_model(coefficients, model)
        m = model.clone()
        m.model_options["transformer_options"][KEY] = _Holder(coefficients, float(start_percent), float(end_percent),
                                                                  unique_id)
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY, _calc_cond_batch)
        return (m,)


NODES = {
    "TrainFreeLinearAGCalibrate": (TrainFreeLinearAGCalibrate, "LinearAG Calibrate (TrainFree)"),
    "TrainFreeLinearAGLoad": (TrainFreeLinearAGLoad, "LinearAG Load (TrainFree)"),
    "TrainFreeLinearAG": (TrainFreeLinearAG, "LinearAG (TrainFree)"),
}
