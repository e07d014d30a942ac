"""ComfyUI-signature denoisers built on the exact Gaussian mixture.

``AnalyticModel(...)(x, sigma, **extra_args) -> x0`` behaves like the ``model`` ComfyUI hands a
sampler (KSamplerX0Inpaint): it returns the guided denoised prediction. Internally it goes through
the same network parameterisation ComfyUI's ``model_sampling`` uses (eps, v or flow velocity and
back), counts network evaluations per conditioning, and exposes a ``model_sampling`` object whose
class names match ComfyUI's (EPS, V_PREDICTION, CONST) so family detection can be exercised.
"""
from __future__ import annotations

import torch

from .gmm import GaussianMixture
from .schedules import flow_sigma_table, sd_sigma_table

PREDICTIONS = ("eps", "v", "flow")


class _FakeSampling:
    sigma_data = 1.0


class EPS(_FakeSampling):
    pass


class V_PREDICTION(EPS):
    pass


class CONST(_FakeSampling):
    pass


class X_UNKNOWN(_FakeSampling):
    """A model_sampling type the pack does not know."""


_SAMPLING = {"eps": EPS, "v": V_PREDICTION, "flow": CONST}


class AnalyticModel:
    """Exact denoiser of ``gmm`` (NFE counted per batch row and conditioning) for class ``cls`` (None: unconditional) at CFG scale ``cfg``.

    prediction: "eps" or "v" (VE sigma space, like SD1.5/SDXL) or "flow" (CONST, like SD3/Flux).
    bias: optional callable (x, sigma) -> tensor added to the prediction (an imperfect network).
    """

    def __init__(self, gmm: GaussianMixture, prediction="eps", cls=None, cfg=1.0, bias=None):
        if prediction not in PREDICTIONS:
            raise ValueError(prediction)
        self.gmm, self.prediction, self.cls, self.cfg, self.bias = gmm, prediction, cls, cfg, bias
        self.kind = "flow" if prediction == "flow" else "ve"
        self.model_sampling = _SAMPLING[prediction]()
        self.model_sampling.sigmas = flow_sigma_table() if self.kind == "flow" else sd_sigma_table()
        self.nfe = 0
        self.sigmas_seen: list[float] = []

    def exact(self, x, sigma):
        """The exact (guided) denoiser, without the network round trip."""
        if self.cls is None or self.cfg == 1.0:
            return self.gmm.denoise(x, sigma, self.kind, self.cls)
        return self.gmm.cfg_denoise(x, sigma, self.cls, self.cfg, self.kind)

    def __call__(self, x, sigma, **extra_args):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64)
        d = self.exact(x, sigma)
        if self.bias is not None:
            d = d + self.bias(x, sigma)
        # the network's view and back, as comfy.model_sampling does
        if self.prediction == "eps":
            out = (x - d) / sig
            d = x - out * sig
        elif self.prediction == "v":
            sd = self.model_sampling.sigma_data
            c = (sig**2 + sd**2) ** 0.5
            out = (x * sd**2 / c**2 - d) * c / (sig * sd)
            d = x * sd**2 / c**2 - out * sig * sd / c
        else:
            out = (x - d) / sig
            d = x - out * sig
        self.nfe += x.shape[0] * (2 if (self.cls is not None and self.cfg != 1.0) else 1)
        self.sigmas_seen.append(float(sigma.reshape(-1)[0]))
        return d.to(x.dtype)


def noise_like(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=g)


def initial_state(noise, sigma0, kind, latent=None):
    """ComfyUI's noise_scaling: VE ``latent + sigma*n``; flow ``sigma*n + (1-sigma)*latent``."""
    latent = torch.zeros_like(noise) if latent is None else latent
    if kind == "flow":
        return sigma0 * noise + (1.0 - sigma0) * latent
    return latent + sigma0 * noise
