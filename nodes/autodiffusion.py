"""Schedule search node: step positions searched for one model, step count and sampler (SIGMAS)."""
from __future__ import annotations

import hashlib
import logging

import comfy.samplers
import torch

from .. import calibration
from ..samplers.autodiffusion import search_schedule
from ..samplers.momentum import sample_dpmpp_2m_hb
from .calibration_support import (Progress, empty_latent_for, interruptible, method_dir, model_keys, reuse, save,
                                  settings_key, with_guided_model, written_state, wrote)

METHOD = "schedule_search"
PAPER = "Li et al., AutoDiffusion: Training-Free Optimization of Time Steps and Architectures (ICCV 2023)"
log = logging.getLogger("trainfree")


_PACK = __name__.rsplit(".nodes.", 1)[0]      # ComfyUI names the pack's module after its folder path


def _describe(v) -> str:
    """A sampler option by content, stable across runs and restarts (never a memory address)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(_describe, v)) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}={_describe(x)}" for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(v, torch.Tensor):
        return f"tensor:{calibration.fingerprint([('t', v)])}"
    keys, name = getattr(v, "keys", None), getattr(v, "name", None)
    if isinstance(keys, dict) and isinstance(name, str):                 # a calibration record: its file and keys
        return f"{type(v).__name__}({name};{_describe(keys)})"
    return getattr(v, "__qualname__", type(v).__qualname__)


def _sampler_key(sampler) -> str:
    fn = getattr(sampler, "sampler_function", None)
    if fn is None:
        raise ValueError(f"the schedule search needs a k-diffusion style SAMPLER (KSAMPLER); got {type(sampler).__name__}")
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    module = getattr(fn, "__module__", "") or ""
    if module.startswith(_PACK):
        module = "trainfree" + module[len(_PACK):]
    opts = _describe(dict(getattr(sampler, "extra_options", {})))
    return f"{module}.{name}:{hashlib.sha256(opts.encode()).hexdigest()[:8]}"


def _stochastic(sampler) -> bool:
    """Ancestral / SDE samplers: each run draws new noise, so a schedule fits one noise path only."""
    fn = getattr(sampler, "sampler_function", None)
    label = f"{getattr(fn, '__name__', '')}".lower()
    return any(w in label for w in ("ancestral", "sde", "lcm")) or float(
        sampler.extra_options.get("eta", 0.0) or 0.0) > 0


class TrainFreeScheduleSearch:
    DESCRIPTION = ("Searches the positions of the steps for the connected model, sampler and step count so that "
                   "the result is as close as possible to a many-step reference, on a few samples (the latent's "
                   "batch). Starts from a ComfyUI scheduler and never returns something worse on those samples. "
                   "The result is cached under models/trainfree/schedule_search/<name>. Output: SIGMAS for any "
                   f"sampler node. Time-step search of {PAPER}.")
    CATEGORY = "trainfree/schedules"
    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The searched sigmas (steps + 1 values ending at 0).",)
    FUNCTION = "search"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model (with its LoRAs and patches)."}),
            "positive": ("CONDITIONING", {"tooltip": "Typical prompts."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt used with CFG."}),
            "latent_image": ("LATENT", {"tooltip": "Latent size; its batch is the number of search samples (more "
                                                   "samples generalise better, 16+ recommended)."}),
            "sampler": ("SAMPLER", {"tooltip": "The sampler the schedule is for (from KSamplerSelect or a pack node)."}),
            "steps": ("INT", {"default": 6, "min": 2, "max": 100, "tooltip": "Number of steps (NFE per step depends "
                                                                             "on the sampler)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "CFG you sample with."}),
            "initial_scheduler": (comfy.samplers.SCHEDULER_NAMES, {"default": "karras",
                                                                   "tooltip": "Schedule the search starts from."}),
            "budget": ("INT", {"default": 60, "min": 1, "max": 2000,
                               "tooltip": "Sampler runs the search may spend (each costs steps x the sampler's "
                                          "model calls per step: 1 for euler / dpmpp_2m, 2 for heun / dpm_2)."}),
            "reference_steps": ("INT", {"default": 60, "min": 10, "max": 1000,
                                        "tooltip": "DPM-Solver++ steps of the reference solution."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed of the samples."}),
            "name": ("STRING", {"default": "my_schedule", "tooltip": "Cache file name under "
                                                                     "models/trainfree/schedule_search."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Search again even if a matching file exists."}),
        }}

    @classmethod
    def IS_CHANGED(cls, name=None, **_):
        return written_state(METHOD, name)        # runs again when its file was deleted or replaced

    def search(self, model, positive, negative, latent_image, sampler, steps, cfg, initial_scheduler, budget,
               reference_steps, seed, name, overwrite):
        path = calibration.file_in(method_dir(METHOD), name)
        ms = model.get_model_object("model_sampling")
        latent = empty_latent_for(model, latent_image)
        keys = {**model_keys(model), "sampler": _sampler_key(sampler),
                "steps": steps, "cfg": f"{cfg:g}", "start": initial_scheduler, "latent": "x".join(map(str, latent.shape)),
                "settings": settings_key(budget=budget, reference_steps=reference_steps, seed=seed)}
        cached = reuse(path, METHOD, keys, overwrite)
        wrote(path)
        if cached is not None:
            return (cached["sigmas"].float(),)
        initial = comfy.samplers.calculate_sigmas(ms, initial_scheduler, steps).cpu()
        if initial[-1] != 0 or (initial[:-1] <= initial[1:]).any():
            raise ValueError(f"scheduler {initial_scheduler!r} gives no decreasing schedule ending at 0 for {steps} "
                             "steps; pick another initial scheduler")
        progress = Progress(budget + 1)
        if _stochastic(sampler):
            log.warning("trainfree: schedule search with a stochastic sampler (%s): its noise is fixed by the seed "
                        "during the search, so the schedule fits that noise path and may not carry over to other "
                        "seeds; an ODE sampler (euler, dpmpp_2m, uni_pc ...) gives a schedule for every seed",
                        getattr(sampler.sampler_function, "__name__", "?"))

        def work(model_k, x, extra_args):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)
            start = ms.noise_scaling(initial[0].to(x.device), noise, torch.zeros_like(x), max_denoise=True)
            ref_sig = comfy.samplers.calculate_sigmas(ms, "karras" if initial_scheduler == "karras" else "normal",
                                                      reference_steps).to(x.device)
            if float(ref_sig[0]) != float(initial[0]):
                ref_sig = torch.cat([initial[:1].to(ref_sig), ref_sig[ref_sig < float(initial[0])]])
            reference = sample_dpmpp_2m_hb(interruptible(model_k), start.clone(), ref_sig, extra_args, beta=1.0)
            progress.tick()

            def run(model_, x_, sigmas, extra_args=None, disable=None, **kw):   # sigmas as ComfyUI gives them
                return sampler.sampler_function(model_, x_, sigmas.to(x.device, torch.float32), extra_args=extra_args,
                                                callback=None, disable=True, **sampler.extra_options)

            return search_schedule(interruptible(model_k), start, initial.to(torch.float64), run, reference, extra_args,
                                   budget=budget, sigma_min=float(ms.sigma_min), progress=lambda *_: progress.tick())

        sigmas, best, first = with_guided_model(model, positive, negative, cfg, latent, seed, work)
        save(path, {"sigmas": sigmas.double()}, METHOD, keys)
        log.info("trainfree: schedule search %s: error %.4g -> %.4g (%s)", name, first ** 0.5, best ** 0.5, path)
        return (sigmas.float(),)


NODES = {"TrainFreeScheduleSearch": (TrainFreeScheduleSearch, "Schedule Search (TrainFree)")}
DROPDOWN = {}
