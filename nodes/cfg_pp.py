"""CFG++ for the pack's solvers: a SAMPLER node and KSampler dropdown entries ``trainfree_<solver>_cfg_pp``.

The pure samplers (``samplers/cfg_pp.py``) need the unconditional prediction of every model call.
As ComfyUI's own ``*_cfg_pp`` samplers do, the sampler adds a post-CFG function for the duration of
its run (a chainable list: patches already there run first and stay in place) that records
``uncond_denoised`` and returns ``denoised`` unchanged, with the cfg-1 optimisation disabled so the
unconditional branch is always evaluated. The guidance scale is the CFG value of KSampler / the
guider: lam = cfg (CFG++ uses about 0.4-1.0 where CFG uses 4-12).
"""
from __future__ import annotations

from functools import partial

import comfy.model_patcher

from ..samplers.cfg_pp import CFG_PP_SAMPLERS, sample_dpm_solver_v3_cfg_pp
from .calibration_support import check_matches
from .dpm_solver_v3 import EMS_TYPE
from .sampler_support import SamplerNode, ksampler

PAPER = "Chung et al., CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models (ICLR 2025)"

# solver -> (pure sampler, paper defaults of the base solver)
SOLVERS = {
    "dpmpp_2m": (CFG_PP_SAMPLERS["dpmpp_2m"], {}),
    "dpmpp_2m_hb": (CFG_PP_SAMPLERS["dpmpp_2m_hb"], {"beta": 0.8}),
    "plms": (CFG_PP_SAMPLERS["plms"], {"order": 4}),
    "plms_hb": (CFG_PP_SAMPLERS["plms_hb"], {"order": 4, "beta": 0.9}),
    "ghvb": (CFG_PP_SAMPLERS["ghvb"], {"order": 3.5}),
    "ts_ddim": (CFG_PP_SAMPLERS["ts_ddim"], {"window": 80, "cutoff": 300}),
    "ts_dpmpp_2m": (CFG_PP_SAMPLERS["ts_dpmpp_2m"], {"window": 30, "cutoff": 300}),
    "uni_pc_bh2": (CFG_PP_SAMPLERS["uni_pc"], {"order": 2, "variant": "bh2"}),
    "dpm_solver_v3": (CFG_PP_SAMPLERS["dpm_solver_v3"], {"order": 2}),
}
DESCRIPTIONS = {
    "dpmpp_2m": "DPM-Solver++(2M) CFG++ (the official dpm++_2m_cfg++; unlike core's dpmpp_2m_cfg_pp exact for flow models)",
    "dpmpp_2m_hb": "DPM-Solver++(2M) + heavy ball (beta 0.8)",
    "plms": "PLMS / iPNDM-style 4th-order Adams-Bashforth",
    "plms_hb": "PLMS + heavy ball (order 4, beta 0.9)",
    "ghvb": "GHVB 3.5",
    "ts_ddim": "Time-Shift DDIM (window 80, cutoff 300)",
    "ts_dpmpp_2m": "Time-Shift DPM-Solver++(2M) (window 30, cutoff 300)",
    "uni_pc_bh2": "UniPC-bh2 order 2 (predictor-corrector)",
    "dpm_solver_v3": "DPM-Solver-v3 order 2 with corrector (connect statistics to the ems input; none = DPM-Solver++)",
}


def _inpainted(model, d_u, sigma, model_options, denoise_mask):
    """``d_u`` with ComfyUI's inpainting applied as to the guided prediction: KSamplerX0Inpaint replaces the model's
    output outside the mask by the source latent (after the mask function, e.g. Differential Diffusion's). Left
    raw there, a multistep CFG++ solver's last step (PLMS, GHVB) brings the raw prediction back into the kept
    area."""
    latent = getattr(model, "latent_image", None)
    if denoise_mask is None or latent is None:
        return d_u
    if "denoise_mask_function" in model_options:
        denoise_mask = model_options["denoise_mask_function"](
            sigma, denoise_mask, extra_options={"model": model.inner_model, "sigmas": model.sigmas})
    return d_u * denoise_mask + latent * (1.0 - denoise_mask)


def with_uncond(pure):
    """A ComfyUI sampler function running ``pure`` with the unconditional prediction of each call."""

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = dict(extra_args or {})
        box = [None]

        def capture(args):
            box[0] = None if args.get("uncond") is None else _inpainted(
                model, args["uncond_denoised"], args["sigma"], args["model_options"], extra_args.get("denoise_mask"))
            return args["denoised"]

        def uncond():                 # consumed once per model call: never a stale prediction
            out, box[0] = box[0], None
            return out

        options_ = extra_args.get("model_options", {}).copy()
        extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
            options_, capture, disable_cfg1_optimization=True)
        return pure(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, uncond=uncond,
                    **options)

    sampler.__name__ = getattr(pure, "__name__", "cfg_pp_sampler")
    return sampler


def _v3_checked(model, x, sigmas, extra_args=None, callback=None, disable=None, record=None, **options):
    if record is not None:
        check_matches(record.name, record.keys, model, "DPM-Solver-v3 Calibrate")
    return sample_dpm_solver_v3_cfg_pp(model, x, sigmas, extra_args, callback, disable,
                                       ems=None if record is None else record.ems, **options)


class TrainFreeCFGppSampler(SamplerNode):
    DESCRIPTION = ("CFG++ for the pack's solvers: guidance is applied to the denoised estimate with a small scale "
                   "and the sample is renoised with the unconditional (negative-prompt) noise, which keeps it on "
                   "the data manifold: fewer over-saturated, off-distribution samples at high guidance and few "
                   "steps. Set the guider's CFG to the CFG++ scale lambda (0.4-1.0; about CFG 1 + 11.5 lambda). "
                   f"Needs a negative prompt (an empty one is fine). From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A CFG++ sampler for SamplerCustomAdvanced / SamplerCustom (with CFGGuider: cfg = lambda).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver": (list(SOLVERS), {
            "default": "dpmpp_2m",
            "tooltip": "Base solver (paper defaults of each): " + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
                       + ". All are exact for eps, v-prediction and rectified-flow models."})},
            "optional": {"ems": (EMS_TYPE, {"tooltip": "DPM-Solver-v3 statistics (only with solver dpm_solver_v3)."})}}

    def get_sampler(self, solver, ems=None):
        if solver not in SOLVERS:
            raise ValueError(f"unknown CFG++ solver {solver!r}; one of {list(SOLVERS)}")
        if ems is not None and solver != "dpm_solver_v3":
            raise ValueError(f"statistics (ems) are for the dpm_solver_v3 solver, not {solver!r}: disconnect them "
                             "or pick dpm_solver_v3")
        pure, defaults = SOLVERS[solver]
        if solver == "dpm_solver_v3":
            return (ksampler(with_uncond(_v3_checked), record=ems, **defaults),)
        return (ksampler(with_uncond(pure), **defaults),)


NODES = {"TrainFreeCFGppSampler": (TrainFreeCFGppSampler, "CFG++ Sampler (TrainFree)")}

# KSampler dropdown entries trainfree_<solver>_cfg_pp (KSampler's cfg is lambda). DPM-Solver-v3 needs
# its statistics to differ from DPM-Solver++, so it is offered by the node only.
DROPDOWN = {f"{name}_cfg_pp": with_uncond(partial(pure, **defaults))
            for name, (pure, defaults) in SOLVERS.items() if name != "dpm_solver_v3"}
