"""DPM-Solver-v3 nodes: calibrate the empirical model statistics (EMS) once, then sample with them."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.samplers
import torch

from .. import calibration
from ..calibration import fingerprint
from ..samplers.common import kind_of_sampling
from ..samplers.dpm_solver_v3 import sample_dpm_solver_v3
from ..samplers.dpm_solver_v3_ems import EMS, S_MAX, S_MIN, estimate, lambda_range
from ..samplers.momentum import sample_dpmpp_2m_hb
from .calibration_support import (Progress, check_matches, empty_latent_for, list_files, load_named, loaded_state,
                                  method_dir, model_keys, reuse, save, settings_key, warn_if_other_run,
                                  with_guided_model, written_state, wrote)
from .sampler_support import CATEGORY, SamplerNode, ksampler

METHOD = "dpm_solver_v3"
EMS_TYPE = "TRAINFREE_EMS"
PAPER = "Zheng et al., DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics (NeurIPS 2023)"
log = logging.getLogger("trainfree")


@dataclass
class EmsRecord:
    ems: EMS
    keys: dict
    name: str


def _keys(model, shape, cfg, per_pixel, settings=""):
    return {**model_keys(model), "cfg": f"{cfg:g}",
            "stats": "pixel:" + "x".join(map(str, shape)) if per_pixel else f"channel:{shape[0]}",
            "settings": settings}


def _calibration(samples, grid_points, data_steps, per_pixel, seed, clean):
    """The calibration, as work for ``with_guided_model``: draw clean samples, then estimate."""
    def work(model, x, extra_args):
        ms = model.inner_model.inner_model.model_sampling
        kind = kind_of_sampling(ms)
        batches = max(1, samples // x.shape[0])
        data_sig = comfy.samplers.calculate_sigmas(ms, "normal", data_steps).to(x.device)
        progress = Progress(batches * (0 if clean is not None else data_steps) + 2 * grid_points * batches)
        if clean is not None:
            x0 = [c.to(x) for c in clean.split(x.shape[0])]
        else:
            gen = torch.Generator().manual_seed(seed)
            x0 = []
            for _ in range(batches):
                noise = torch.randn(x.shape, generator=gen).to(x)
                start = ms.noise_scaling(data_sig[0], noise, torch.zeros_like(x), max_denoise=True)
                x0.append(sample_dpmpp_2m_hb(model, start, data_sig, extra_args, callback=progress.tick, beta=1.0))
        lo, hi = lambda_range(float(ms.sigma_max), float(ms.sigma_min), kind)
        grid = torch.linspace(lo - 0.05, hi + 0.05, grid_points, dtype=torch.float64)
        pool = () if per_pixel else tuple(range(2, x.ndim))
        return estimate(model, x0, grid, kind, extra_args, pool_dims=pool, seed=seed, progress=progress.tick)
    return work


class TrainFreeDPMSolverV3Calibrate:
    DESCRIPTION = ("Computes DPM-Solver-v3's empirical model statistics for the connected model, prompts, CFG and "
                   "latent size, and saves them under models/trainfree/dpm_solver_v3/<name>.safetensors. If that "
                   "file already exists for this model and settings it is loaded instead (calibrate once). "
                   f"From {PAPER}.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMS_TYPE,)
    OUTPUT_TOOLTIPS = ("The statistics, for the DPM-Solver-v3 Sampler node.",)
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to calibrate (with its LoRAs and patches applied)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompts typical of what you will generate."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt used with CFG."}),
            "latent_image": ("LATENT", {"tooltip": "Latent size to calibrate at; its batch size is the calibration "
                                                   "batch (memory)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                              "tooltip": "CFG scale you will sample with (the paper computes SD statistics per scale)."}),
            "samples": ("INT", {"default": 64, "min": 8, "max": 8192,
                                "tooltip": "Monte-Carlo samples per grid point (paper: 1024; more is smoother)."}),
            "grid_points": ("INT", {"default": 32, "min": 8, "max": 1200,
                                    "tooltip": "Points of the log-SNR grid (paper: 120-1200). Cost: 5 x samples x "
                                               "grid points model evaluations."}),
            "data_steps": ("INT", {"default": 30, "min": 5, "max": 200,
                                   "tooltip": "DPM-Solver++ steps used to draw the model's own clean samples."}),
            "statistics": (["per channel (any resolution)", "per pixel (this resolution)"],
                           {"tooltip": "Per-channel statistics serve every resolution (and video frame count) and "
                                       "need fewer samples; per-pixel ones fit this latent size and frame "
                                       "count only."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Calibration noise seed."}),
            "name": ("STRING", {"default": "my_model_cfg7.5",
                                "tooltip": "File name (letters, digits, . _ -) under models/trainfree/dpm_solver_v3."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Recompute even if a matching file exists."}),
        }, "optional": {
            "clean_latents": ("LATENT", {"tooltip": "Optional clean latents (e.g. VAE-encoded images) to use as data "
                                                    "instead of the model's own samples."}),
        }}

    @classmethod
    def IS_CHANGED(cls, name=None, **_):
        return written_state(METHOD, name)        # runs again when its file was deleted or replaced

    def calibrate(self, model, positive, negative, latent_image, cfg, samples, grid_points, data_steps, statistics,
                  seed, name, overwrite, clean_latents=None):
        path = calibration.file_in(method_dir(METHOD), name)
        latent = empty_latent_for(model, latent_image)
        per_pixel = statistics.startswith("per pixel")
        data = "model samples" if clean_latents is None else "clean:" + fingerprint([("x", clean_latents["samples"])])
        keys = _keys(model, tuple(latent.shape[1:]), cfg, per_pixel, settings_key(
            samples=samples, grid_points=grid_points, data_steps=data_steps, seed=seed, data=data))
        cached = reuse(path, METHOD, keys, overwrite)
        wrote(path)
        if cached is not None:
            return (EmsRecord(_from_tensors(cached, path.name), keys, path.name),)
        clean = None
        if clean_latents is not None:
            clean = model.model.process_latent_in(clean_latents["samples"])
        work = _calibration(samples, grid_points, data_steps, per_pixel, seed, clean)
        ems = with_guided_model(model, positive, negative, cfg, latent, seed, work)
        save(path, ems.tensors(), METHOD, keys)
        log.info("trainfree: DPM-Solver-v3 statistics saved to %s", path)
        _warn_capped(ems.capped, path.name)
        return (EmsRecord(ems, keys, path.name),)


def _warn_capped(share, name):
    if share:
        log.warning("trainfree: DPM-Solver-v3 statistics %s: the slope s was bounded to [%g, %g] in %.0f%% of the "
                    "table (a steep estimate, usually too few samples or grid points); more samples give statistics "
                    "that need no bound", name, S_MIN, S_MAX, 100 * share)


def _from_tensors(t, name):
    ems = EMS(t["lambda"], t["l"], t["s"], t["b"])
    _warn_capped(ems.capped, name)          # a file from before the cap
    return ems


class TrainFreeDPMSolverV3Load:
    DESCRIPTION = "Loads DPM-Solver-v3 statistics saved by the calibration node (checked against the model when sampling)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMS_TYPE,)
    OUTPUT_TOOLTIPS = ("The statistics, for the DPM-Solver-v3 Sampler node.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ems_name": (list_files(METHOD), {"tooltip": "A file in models/trainfree/dpm_solver_v3."})}}

    @classmethod
    def IS_CHANGED(cls, ems_name=None, **_):
        return loaded_state(METHOD, ems_name)       # a recalibrated or replaced file is read again

    def load(self, ems_name):
        tensors, keys, name = load_named(METHOD, ems_name)
        return (EmsRecord(_from_tensors(tensors, name), keys, name),)


def _sample_checked(model, x, sigmas, extra_args=None, callback=None, disable=None, record=None, half=False, **opts):
    ms = model.inner_model.inner_model.model_sampling
    if record is not None:
        check_matches(record.name, record.keys, model, "DPM-Solver-v3 Calibrate")
        warn_if_other_run(record.name, {"cfg": record.keys["cfg"]} if "cfg" in record.keys else {}, model.inner_model)
    if half:   # the corrector only in the low-noise half of the model's time range (paper: t <= 0.5)
        s = float(ms.percent_to_sigma(0.5))
        opts["corrector_sigma_max"] = s / (1 - s) if kind_of_sampling(ms) == "flow" else s
    return sample_dpm_solver_v3(model, x, sigmas, extra_args, callback, disable,
                                ems=None if record is None else record.ems, **opts)


class TrainFreeDPMSolverV3Sampler(SamplerNode):
    DESCRIPTION = ("DPM-Solver-v3: a multistep ODE solver whose parameterisation is fitted to the model through "
                   "empirical statistics (connect them from the Calibrate or Load node). Without statistics it is "
                   f"DPM-Solver++. Best at 5-10 steps. From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A DPM-Solver-v3 sampler for SamplerCustomAdvanced / SamplerCustom.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "order": ("INT", {"default": 2, "min": 1, "max": 3,
                              "tooltip": "Multistep order (paper: 2 with guidance, 3 without)."}),
            "pseudo_order": ("BOOLEAN", {"default": False,
                                         "tooltip": "Pseudo-order predictor (paper: helps at 5 steps or fewer)."}),
            "corrector": (["full", "half", "off"], {"tooltip": "0-NFE corrector; 'half' only at low noise (paper: "
                                                              "better at 5-6 steps with large CFG)."}),
            "lower_order_final": ("BOOLEAN", {"default": True, "tooltip": "Lower order on the last steps (stabler)."}),
        }, "optional": {"ems": (EMS_TYPE, {"tooltip": "Statistics from the Calibrate or Load node; none = DPM-Solver++."})}}

    def get_sampler(self, order, pseudo_order, corrector, lower_order_final, ems=None):
        return (ksampler(_sample_checked, record=ems, order=int(order), pseudo=bool(pseudo_order),
                         corrector=corrector != "off", half=corrector == "half",
                         lower_order_final=bool(lower_order_final)),)


NODES = {
    "TrainFreeDPMSolverV3Calibrate": (TrainFreeDPMSolverV3Calibrate, "DPM-Solver-v3 Calibrate (TrainFree)"),
    "TrainFreeDPMSolverV3Load": (TrainFreeDPMSolverV3Load, "DPM-Solver-v3 Load Statistics (TrainFree)"),
    "TrainFreeDPMSolverV3Sampler": (TrainFreeDPMSolverV3Sampler, "DPM-Solver-v3 Sampler (TrainFree)"),
}
DROPDOWN = {}   # without its statistics DPM-Solver-v3 is DPM-Solver++: no dropdown entry
