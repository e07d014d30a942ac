"""SAMPLER nodes for the time-shift sampler (TS-DDIM and TS-DPM-Solver++(2M))."""
from __future__ import annotations

from functools import partial

from ..samplers.time_shift import sample_ts_ddim, sample_ts_dpmpp_2m
from .sampler_support import SamplerNode, checked, ksampler

PAPER = ("Li et al., Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps "
         "(ICLR 2024, arXiv 2305.15583)")


def _inputs(window, cutoff, source):
    return {"required": {
        "window": ("INT", {"default": window, "min": 0, "max": 1000,
                           "tooltip": "Width of the window of model timesteps (of 1000) searched around the "
                                      f"nominal one; 0 turns the shift off. Paper default here: {window} ({source})."}),
        "cutoff": ("INT", {"default": cutoff, "min": 0, "max": 1000,
                           "tooltip": "Shift only while the nominal model timestep (of 1000; 999 = pure noise) is "
                                      f"above this. Paper default here: {cutoff}."}),
        "data_variance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                    "tooltip": "Per-sample element variance of clean latents. 0 is the paper's "
                                               "statistic (1 - alpha_bar); it biases the shift towards noisier "
                                               "steps for latents of larger variance (SD latents: about 0.8-1)."}),
    }}


class _TimeShiftSampler(SamplerNode):
    """Both time-shift nodes: the same inputs, their own solver and paper default window."""

    SOLVER, WINDOW, SOURCE = None, 0, ""

    @classmethod
    def INPUT_TYPES(cls):
        return _inputs(cls.WINDOW, 300, cls.SOURCE)

    def get_sampler(self, window, cutoff, data_variance):
        checked(window=(window, 0, 1000), cutoff=(cutoff, 0, 1000), data_variance=(data_variance, 0.0, 10.0))
        return (ksampler(self.SOLVER, window=int(window), cutoff=int(cutoff), data_variance=float(data_variance)),)


class TrainFreeTimeShiftDDIMSampler(_TimeShiftSampler):
    DESCRIPTION = ("DDIM (Euler) sampler with shifted time steps: each step asks the model about the noise level "
                   "the current sample actually looks like (matched on its variance), reducing exposure bias. "
                   f"From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A TS-DDIM sampler for SamplerCustomAdvanced / SamplerCustom.",)
    SOLVER = staticmethod(sample_ts_ddim)
    WINDOW, SOURCE = 80, "official TS-DDIM example"


class TrainFreeTimeShiftDPMPP2MSampler(_TimeShiftSampler):
    DESCRIPTION = ("DPM-Solver++(2M) with shifted time steps: the network time and the step start follow the "
                   f"noise level the sample looks like, reducing exposure bias. From {PAPER}.")
    OUTPUT_TOOLTIPS = ("A TS-DPM-Solver++(2M) sampler for SamplerCustomAdvanced / SamplerCustom.",)
    SOLVER = staticmethod(sample_ts_dpmpp_2m)
    WINDOW, SOURCE = 30, "official TS-DPM-Solver example"


NODES = {
    "TrainFreeTimeShiftDDIMSampler": (TrainFreeTimeShiftDDIMSampler, "Time-Shift DDIM Sampler (TrainFree)"),
    "TrainFreeTimeShiftDPMPP2MSampler": (TrainFreeTimeShiftDPMPP2MSampler, "Time-Shift DPM++ 2M Sampler (TrainFree)"),
}

DROPDOWN = {
    "ts_ddim": partial(sample_ts_ddim, window=80, cutoff=300),
    "ts_dpmpp_2m": partial(sample_ts_dpmpp_2m, window=30, cutoff=300),
}
