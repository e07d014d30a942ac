"""DC-Solver nodes: search compensation ratios for a model (and fit their CPR), then sample with them."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.samplers
import torch

from .. import calibration
from ..samplers.dc_solver import RATIO_BOUNDS, cpr_fit, cpr_ratios, sample_dc_solver, search_ratios
from .calibration_support import (Progress, basic_scheduler_sigmas, check_matches, empty_latent_for, guider_cfg,
                                  interruptible, list_files, load_named, loaded_state, method_dir, model_keys, reuse,
                                  save, settings_key, warn_if_other_run, with_guided_model, written_state, wrote)
from .sampler_support import CATEGORY, SamplerNode, ksampler

METHOD = "dc_solver"
DC_TYPE = "TRAINFREE_DC_RATIOS"
PAPER = "Zhao et al., DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation (ECCV 2024)"
log = logging.getLogger("trainfree")


def _span(values, fmt):
    lo, hi = min(values), max(values)
    return fmt % lo if lo == hi else f"{fmt % lo}-{fmt % hi}"


@dataclass
class DcRecord:
    searched: dict          # {(nfe, cfg): [ratios]}
    cpr: torch.Tensor       # 36 coefficients
    keys: dict
    name: str

    def ratios(self, nfe: int, cfg: float) -> list:
        for (n, c), r in self.searched.items():
            if n == nfe and abs(c - cfg) < 1e-6:
                return r
        nfes, cfgs = [n for n, _ in self.searched], [c for _, c in self.searched]
        if nfe >= 3 and not (min(nfes) <= nfe <= max(nfes) and min(cfgs) - 1e-6 <= cfg <= max(cfgs) + 1e-6):
            log.warning("trainfree: DC-Solver ratios in %s were searched for steps %s and CFG %s; %d steps at CFG %g "
                        "is extrapolated by the regression (ratios clamped to [%g, %g]). Add this step count / CFG "
                        "to the search for searched ratios.", self.name, _span(nfes, "%d"), _span(cfgs, "%g"), nfe, cfg,
                        *RATIO_BOUNDS)
        return cpr_ratios(self.cpr, nfe, cfg)


def _numbers(text, kind, lo, hi, what):
    try:
        vals = sorted({kind(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError as e:
        raise ValueError(f"{what}: write numbers separated by commas, got {text!r}") from e
    if not vals or any(not lo <= v <= hi for v in vals):
        raise ValueError(f"{what}: each value must be in [{lo}, {hi}], got {text!r}")
    return vals


def _to_tensors(searched, cpr):
    t = {"cpr": cpr}
    for (n, c), r in searched.items():
        t[f"ratios.{n}.{c:g}"] = torch.tensor(r, dtype=torch.float64)
    return t


def _from_tensors(t):
    searched = {}
    for k, v in t.items():
        if k.startswith("ratios."):
            _, n, c = k.split(".", 2)
            searched[(int(n), float(c))] = v.tolist()
    return searched, t["cpr"]


class TrainFreeDCSolverSearch:
    DESCRIPTION = ("Searches DC-Solver's compensation ratios for the connected model on a few samples (the latent's "
                   "batch), for each listed step count and CFG, fits the cascade polynomial regression that predicts "
                   "ratios for other step counts and CFG, and saves it all under models/trainfree/dc_solver/<name>."
                   f" A matching existing file is loaded instead. From {PAPER}.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DC_TYPE,)
    OUTPUT_TOOLTIPS = ("Compensation ratios, for the DC-Solver Sampler node.",)
    FUNCTION = "search"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to calibrate (with its LoRAs and patches applied)."}),
            "positive": ("CONDITIONING", {"tooltip": "Typical prompts."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt used with CFG."}),
            "latent_image": ("LATENT", {"tooltip": "Latent size; its batch size is the number of search samples "
                                                   "(paper: 10)."}),
            "scheduler": (comfy.samplers.SCHEDULER_NAMES, {"tooltip": "The scheduler you will sample with: the "
                                                                      "ratios belong to its sigmas."}),
            "steps": ("STRING", {"default": "5,6,8,10", "tooltip": "Step counts to search (comma separated)."}),
            "cfgs": ("STRING", {"default": "7.5", "tooltip": "CFG scales to search (comma separated). Three or more "
                                                             "let the regression interpolate in CFG."}),
            "iterations": ("INT", {"default": 10, "min": 2, "max": 40,
                                   "tooltip": "Golden-section iterations per step (1 model call each)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed of the samples."}),
            "name": ("STRING", {"default": "my_model_dc", "tooltip": "File name under models/trainfree/dc_solver."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Search again even if a matching file exists."}),
        }}

    @classmethod
    def IS_CHANGED(cls, name=None, **_):
        return written_state(METHOD, name)        # runs again when its file was deleted or replaced

    def search(self, model, positive, negative, latent_image, scheduler, steps, cfgs, iterations, seed, name,
               overwrite):
        path = calibration.file_in(method_dir(METHOD), name)
        nfes = _numbers(steps, int, 3, 100, "steps")
        scales = _numbers(cfgs, float, 1.0, 30.0, "cfgs")
        ms = model.get_model_object("model_sampling")
        keys = {**model_keys(model), "scheduler": scheduler,
                "grid": f"steps={','.join(map(str, nfes))};cfg={','.join(f'{c:g}' for c in scales)}"}
        latent = empty_latent_for(model, latent_image)
        keys["settings"] = settings_key(iterations=iterations, seed=seed,
                                        latent="x".join(map(str, latent.shape)))
        cached = reuse(path, METHOD, keys, overwrite)
        wrote(path)
        if cached is not None:
            return (DcRecord(*_from_tensors(cached), keys, path.name),)
        progress = Progress(len(scales) * sum(nfes))
        searched = {}
        for cfg in scales:
            def work(model_k, x, extra_args):
                out = {}
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn(x.shape, generator=gen).to(x)
                for n in nfes:
                    sig = basic_scheduler_sigmas(ms, scheduler, n).to(x.device)     # as BasicScheduler gives
                    start = ms.noise_scaling(sig[0], noise, torch.zeros_like(x), max_denoise=True)
                    out[n] = search_ratios(interruptible(model_k), start, sig, extra_args, iters=iterations,
                                           progress=progress.tick)
                return out
            for n, r in with_guided_model(model, positive, negative, cfg, latent, seed, work).items():
                searched[(n, cfg)] = r
        cpr = cpr_fit(searched)
        save(path, _to_tensors(searched, cpr), METHOD, keys)
        log.info("trainfree: DC-Solver ratios saved to %s", path)
        return (DcRecord(searched, cpr, keys, path.name),)


class TrainFreeDCSolverLoad:
    DESCRIPTION = "Loads DC-Solver ratios saved by the search node (checked against the model when sampling)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (DC_TYPE,)
    OUTPUT_TOOLTIPS = ("Compensation ratios, for the DC-Solver Sampler node.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ratios_name": (list_files(METHOD), {"tooltip": "A file in models/trainfree/dc_solver."})}}

    @classmethod
    def IS_CHANGED(cls, ratios_name=None, **_):
        return loaded_state(METHOD, ratios_name)       # a recalibrated or replaced file is read again

    def load(self, ratios_name):
        tensors, keys, name = load_named(METHOD, ratios_name)
        return (DcRecord(*_from_tensors(tensors), keys, name),)


def _sample_dc(model, x, sigmas, extra_args=None, callback=None, disable=None, record=None, **opts):
    ratios = None
    if record is not None:
        check_matches(record.name, record.keys, model, "DC-Solver Search")
        warn_if_other_run(record.name, {"scheduler": record.keys.get("scheduler")}, model.inner_model, sigmas=sigmas)
        cfg = guider_cfg(model.inner_model)
        if cfg is None:
            cfg = min(c for _, c in record.searched)
            log.warning("trainfree: DC-Solver: this guider has no single CFG scale; using the ratios of CFG %g", cfg)
        ratios = record.ratios(len(sigmas) - 1, cfg)
    return sample_dc_solver(model, x, sigmas, extra_args, callback, disable, ratios=ratios, **opts)


class TrainFreeDCSolverSampler(SamplerNode):
    DESCRIPTION = ("DC-Solver: UniPC predictor-corrector whose stored model output is compensated (interpolated to "
                   "a searched time) before each step, fixing the corrector's misalignment at few steps. Ratios "
                   "come from the Search or Load node: the searched ones for a searched step count and CFG, the "
                   f"regression's otherwise. Without ratios it is UniPC. From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A DC-Solver sampler for SamplerCustomAdvanced / SamplerCustom.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "order": ("INT", {"default": 2, "min": 1, "max": 3, "tooltip": "UniPC order (paper, SD: 2)."}),
            "variant": (["bh2", "bh1"], {"tooltip": "UniPC's B(h) (paper, SD: bh2)."}),
        }, "optional": {"dc_ratios": (DC_TYPE, {"tooltip": "Ratios from the Search or Load node; none = UniPC."})}}

    def get_sampler(self, order, variant, dc_ratios=None):
        return (ksampler(_sample_dc, record=dc_ratios, order=int(order), variant=variant),)


NODES = {
    "TrainFreeDCSolverSearch": (TrainFreeDCSolverSearch, "DC-Solver Search Ratios (TrainFree)"),
    "TrainFreeDCSolverLoad": (TrainFreeDCSolverLoad, "DC-Solver Load Ratios (TrainFree)"),
    "TrainFreeDCSolverSampler": (TrainFreeDCSolverSampler, "DC-Solver Sampler (TrainFree)"),
}
DROPDOWN = {}   # without searched ratios DC-Solver is UniPC, which ComfyUI has
