"""SAMPLER nodes for the momentum solvers (GHVB, PLMS + heavy ball, DPM-Solver++(2M) + heavy ball)."""
from __future__ import annotations

from functools import partial

from ..samplers.momentum import MAX_ORDER, sample_dpmpp_2m_hb, sample_ghvb, sample_plms_hb
from .sampler_support import SamplerNode, checked, ksampler

PAPER = "Wizadwongsa & Suwajanakorn, Diffusion Sampling with Momentum for Mitigating Divergence Artifacts (arXiv 2307.11118)"


class TrainFreeGHVBSampler(SamplerNode):
    DESCRIPTION = ("Generalized Heavy Ball (GHVB) multistep sampler: Adams-Bashforth with momentum. Fewer "
                   "divergence artifacts (blown-out colours, noise blobs) at low step counts and high CFG than "
                   f"PLMS/DPM-Solver++, keeping most of their accuracy. From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A GHVB sampler for SamplerCustomAdvanced / SamplerCustom.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"order": ("FLOAT", {
            "default": 3.5, "min": 0.1, "max": float(MAX_ORDER), "step": 0.05,
            "tooltip": "Momentum number r = k - 1 + beta: Adams-Bashforth order k = ceil(r) with momentum "
                       "beta = frac(r) (integer r: plain order-r Adams-Bashforth, no momentum). Lower r is more "
                       "stable, higher r more accurate. Paper: 3.5 at CFG 7.5, 3.2 at 15, 3.1 at 22.5; 1.5 at "
                       "very few steps."})}}

    def get_sampler(self, order):
        checked(order=(order, 0.01, MAX_ORDER))
        return (ksampler(sample_ghvb, order=float(order)),)


class TrainFreePLMSHeavyBallSampler(SamplerNode):
    DESCRIPTION = ("PLMS (Adams-Bashforth) sampler with heavy-ball momentum: an exponential moving average of "
                   "the solver's noise estimate damps the oscillations that cause divergence artifacts at high "
                   f"CFG. First-order accurate. From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A PLMS + heavy-ball sampler for SamplerCustomAdvanced / SamplerCustom.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "order": ("INT", {"default": 4, "min": 1, "max": MAX_ORDER,
                              "tooltip": "Adams-Bashforth order of the PLMS step (the paper uses 4)."}),
            "beta": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 1.0, "step": 0.01,
                               "tooltip": "Momentum: 1 = plain PLMS, lower = stronger damping. Paper (SD1.5): "
                                          "0.9 at CFG 7.5, 0.8 at 15, 0.6 at 22.5; 0.6-0.8 for fine-tuned models."}),
        }}

    def get_sampler(self, order, beta):
        checked(order=(order, 1, MAX_ORDER), beta=(beta, 0.01, 1.0))
        return (ksampler(sample_plms_hb, order=int(order), beta=float(beta)),)


class TrainFreeDPMPP2MHeavyBallSampler(SamplerNode):
    DESCRIPTION = ("DPM-Solver++(2M) with heavy-ball momentum on its second-order data estimate: the same "
                   f"solver with damped oscillations at high CFG and few steps. From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A DPM-Solver++(2M) + heavy-ball sampler for SamplerCustomAdvanced / SamplerCustom.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"beta": ("FLOAT", {
            "default": 0.8, "min": 0.01, "max": 1.0, "step": 0.01,
            "tooltip": "Momentum: 1 = plain DPM-Solver++(2M), lower = stronger damping (paper: 0.8)."})}}

    def get_sampler(self, beta):
        checked(beta=(beta, 0.01, 1.0))
        return (ksampler(sample_dpmpp_2m_hb, beta=float(beta)),)


NODES = {
    "TrainFreeGHVBSampler": (TrainFreeGHVBSampler, "GHVB Sampler (TrainFree)"),
    "TrainFreePLMSHeavyBallSampler": (TrainFreePLMSHeavyBallSampler, "PLMS + Heavy Ball Sampler (TrainFree)"),
    "TrainFreeDPMPP2MHeavyBallSampler": (TrainFreeDPMPP2MHeavyBallSampler, "DPM++ 2M + Heavy Ball Sampler (TrainFree)"),
}

# KSampler dropdown entries, with the paper's defaults
DROPDOWN = {
    "ghvb": partial(sample_ghvb, order=3.5),
    "plms_hb": partial(sample_plms_hb, order=4, beta=0.9),
    "dpmpp_2m_hb": partial(sample_dpmpp_2m_hb, beta=0.8),
}
