"""Hybrid base -> distilled inference as a GUIDER: the first step(s) with the base model, the rest distilled."""
from __future__ import annotations

import logging

import comfy.samplers
import torch

from ..guidance.hybrid_inference import check_compatible, offset_callback, refine, switch_index
from ..samplers.common import UnsupportedModelError, kind_of_sampling

PAPER = "Gandikota & Bau, Distilling Diversity and Control in Diffusion Models (arXiv 2503.10637)"
log = logging.getLogger("trainfree")


def _family(model, which):
    try:
        kind = kind_of_sampling(model.get_model_object("model_sampling"))
    except UnsupportedModelError as e:
        raise ValueError(f"Hybrid inference: the {which} model is not supported ({e})") from e
    return kind, type(model.get_model_object("latent_format")).__name__


class HybridGuider:
    """Two CFGGuiders sharing one sigma schedule: base for the first ``base_steps`` steps, distilled after."""

    def __init__(self, base, distilled, base_steps, base_substeps=1):
        self.base, self.distilled, self.base_steps = base, distilled, int(base_steps)
        self.base_substeps = int(base_substeps)
        self.model_patcher = distilled.model_patcher          # latent channels, previews (SamplerCustomAdvanced)
        self.model_options = distilled.model_options

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        n = sigmas.shape[-1] - 1
        k = switch_index(n, self.base_steps)
        if k == 0 or n <= 0:
            return self.distilled.sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                         seed)
        m = self.base_substeps
        if k >= n and m == 1:
            return self.base.sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        x = self.base.sample(noise, latent_image, sampler, refine(sigmas[: k + 1], m), denoise_mask,
                             None if m > 1 else offset_callback(callback, 0, n), disable_pbar, seed)
        if k >= n:
            return x
        log.info("trainfree: hybrid inference: %d of %d steps with the base model, the rest distilled", k, n)
        if denoise_mask is None:   # the hand-off: zero noise, the partial sample as the latent (chained KSamplers)
            return self.distilled.sample(torch.zeros_like(noise), x, sampler, sigmas[k:], None,
                                         offset_callback(callback, k, n), disable_pbar, seed)
        # inpainting: the region outside the mask must stay the source latent, which ComfyUI re-noises from the
        # latent and the noise at every step; so hand over the source latent and the noise that turns it into x
        return self.distilled.sample(self._implied_noise(x, latent_image, sigmas[k]), latent_image, sampler,
                                     sigmas[k:], denoise_mask, offset_callback(callback, k, n), disable_pbar, seed)

    def _implied_noise(self, x, source, sigma):
        """The noise n with noise_scaling(sigma, n, source) = the sampler state that the partial sample x stands
        for (what noise_scaling(sigma, 0, x) restores in the plain hand-off); the scaling is affine in n."""
        model = self.distilled.model_patcher.model
        ms = self.distilled.model_patcher.get_model_object("model_sampling")
        x_in, src_in = model.process_latent_in(x), model.process_latent_in(source.to(x))
        s = sigma.to(x_in)
        state = ms.noise_scaling(s, torch.zeros_like(x_in), x_in, max_denoise=False)
        zero = ms.noise_scaling(s, torch.zeros_like(x_in), src_in, max_denoise=False)
        unit = ms.noise_scaling(s, torch.ones_like(x_in), src_in, max_denoise=False) - zero
        return (state - zero) / unit


class TrainFreeHybridGuider:
    DESCRIPTION = ("Hybrid inference: the first, highest-noise step(s) are sampled by the base model with CFG, the "
                   "rest by its distilled few-step version (Turbo, Lightning, DMD2, LCM, Flux-schnell), restoring "
                   "the base model's diversity at nearly distilled speed. Both use the sigmas given to "
                   "SamplerCustomAdvanced (schedule them for the distilled model). The models must share latent "
                   f"format and sigma space. From {PAPER}.")
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A guider for SamplerCustomAdvanced that switches models after base_steps steps.",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base_model": ("MODEL", {"tooltip": "The base (undistilled) model, e.g. SDXL or Flux-dev."}),
            "distilled_model": ("MODEL", {"tooltip": "Its distilled version, e.g. SDXL-Turbo/Lightning/DMD2 or "
                                                     "Flux-schnell."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt (used by both models)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (the base model's CFG; the distilled "
                                                     "model uses it only with distilled_cfg > 1)."}),
            "base_cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                   "tooltip": "CFG of the base model's step(s) (paper, SDXL: 5)."}),
            "distilled_cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                        "tooltip": "CFG of the distilled model (1 = no guidance, as distilled "
                                                   "models are sampled)."}),
            "base_steps": ("INT", {"default": 1, "min": 0, "max": 1000,
                                   "tooltip": "Steps, from the first, sampled with the base model (paper: 1). 0 = "
                                              "distilled model only; >= the step count = base model only."}),
            "base_substeps": ("INT", {"default": 1, "min": 1, "max": 50,
                                      "tooltip": "Base-model steps per base step (the paper's script runs the base "
                                                 "model for 4 of its own steps down to the distilled model's "
                                                 "second sigma). 1 = one base evaluation per base step."}),
        }}

    def get_guider(self, base_model, distilled_model, positive, negative, base_cfg, distilled_cfg, base_steps,
                   base_substeps=1):
        bk, bl = _family(base_model, "base")
        dk, dl = _family(distilled_model, "distilled")
        check_compatible(bk, dk, bl, dl)
        guiders = []
        for model, cfg in ((base_model, base_cfg), (distilled_model, distilled_cfg)):
            g = comfy.samplers.CFGGuider(model)
            g.set_conds(positive, negative)
            g.set_cfg(cfg)
            guiders.append(g)
        return (HybridGuider(guiders[0], guiders[1], base_steps, base_substeps),)


NODES = {"TrainFreeHybridGuider": (TrainFreeHybridGuider, "Hybrid Base→Distilled Guider (TrainFree)")}
DROPDOWN = {}
