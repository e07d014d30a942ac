"""Sigma-space bookkeeping shared by the pack's solvers (pure torch, no ComfyUI import).

ComfyUI hands every sampler a denoiser ``model(x, sigma, **extra_args) -> x0`` and a state that is
``x = alpha * x0 + s * noise`` with

* ``kind == "ve"`` (EPS, V_PREDICTION, EDM models such as SD1.5/SDXL):  alpha = 1,         s = sigma
* ``kind == "flow"`` (CONST models such as SD3, Flux, Wan):            alpha = 1 - sigma, s = sigma

Solvers written for the VE form (x_ve = x / alpha, sigma_ve = s / alpha) are run on flow models
through this exact change of variables, so one solver serves every model family ComfyUI supports.
"""
from __future__ import annotations

import math

import torch

KINDS = ("ve", "flow")


class SamplerInputError(ValueError):
    """Bad input to a sampler: raised before any model evaluation, with a message for the user."""


class UnsupportedModelError(SamplerInputError):
    """The model's sampling type is not one this sampler knows how to handle."""


def _model_sampling(model):
    """ComfyUI's model_sampling object behind a sampler's ``model``, if there is one (duck-typed)."""
    for path in (("inner_model", "inner_model", "model_sampling"), ("inner_model", "model_sampling"),
                 ("model_sampling",)):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def kind_of_sampling(model_sampling) -> str:
    """'flow' for ComfyUI's CONST sampling, 've' for the EPS family; anything else is refused."""
    names = [c.__name__ for c in type(model_sampling).__mro__]
    if "CONST" in names:
        return "flow"
    if "EPS" in names or "COSMOS_RFLOW" in names:
        return "ve"
    raise UnsupportedModelError(
        f"unknown model sampling type {type(model_sampling).__name__} ({', '.join(names[:-1])}): "
        "TrainFree samplers support eps / v-prediction (VE sigma space) and rectified-flow (CONST) models")


def resolve_kind(model, kind=None) -> str:
    """The model family: the explicit ``kind`` option, else read off ComfyUI's objects, else 've'."""
    if kind is not None:
        if kind not in KINDS:
            raise SamplerInputError(f"kind must be one of {KINDS}, got {kind!r}")
        return kind
    ms = _model_sampling(model)
    return "ve" if ms is None else kind_of_sampling(ms)


def check_inputs(x: torch.Tensor, sigmas: torch.Tensor, kind: str) -> None:
    """Refuse what would make a solver produce garbage, before the first model call."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise SamplerInputError(f"sigmas must be a 1-D schedule with at least 2 values (got shape {tuple(sigmas.shape)})")
    if not torch.isfinite(sigmas).all():
        raise SamplerInputError("sigmas contain NaN or infinity")
    if (sigmas[:-1] <= sigmas[1:]).any():
        raise SamplerInputError(f"sigmas must be strictly decreasing, got {[round(float(s), 4) for s in sigmas]}")
    if sigmas[-1] < 0 or (sigmas[:-1] <= 0).any():
        raise SamplerInputError("sigmas must be positive (only the last one may be 0)")
    if kind == "flow" and sigmas[0] > 1.0 + 1e-6:
        raise SamplerInputError(f"a rectified-flow model needs sigmas <= 1, got sigma_max {float(sigmas[0]):.4g}")
    if not torch.isfinite(x).all():
        raise SamplerInputError("the latent contains NaN or infinity")


def alpha_s(sigma: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, s) of ``x = alpha * x0 + s * noise`` at ComfyUI noise level ``sigma``."""
    if kind == "flow":
        return (1.0 - sigma).clamp(min=0.0), sigma
    return torch.ones_like(sigma), sigma


def half_log_snr(sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """lambda = log(alpha / s); +inf at sigma = 0, -inf at sigma = 1 for flow."""
    a, s = alpha_s(sigma, kind)
    return torch.log(a) - torch.log(s)


def check_range(name: str, value, lo, hi) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
        raise SamplerInputError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def precise(t: torch.Tensor) -> torch.dtype:
    """float64 for accumulations, except on Apple's MPS, which has none."""
    return torch.float32 if t.device.type == "mps" else torch.float64


STEP_SIGMA = "trainfree_step_sigma"   # transformer_options key: the schedule sigma of the step being evaluated


def at_step(extra_args: dict, sigma) -> dict:
    """``extra_args`` telling model patches which schedule step this call belongs to, for samplers that call the
    model at another sigma than the schedule's (time shift): caches and step-keyed patches read STEP_SIGMA
    instead of guessing the step from the sigma of the call. Without ComfyUI's model_options: unchanged."""
    mo = extra_args.get("model_options")
    if not isinstance(mo, dict):
        return extra_args
    to = dict(mo.get("transformer_options") or {})
    to[STEP_SIGMA] = float(sigma)
    return dict(extra_args, model_options=dict(mo, transformer_options=to))


def report(callback, x, i, sigma, denoised) -> None:
    """ComfyUI's per-step callback: drives the progress bar, the previews and Cancel."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
