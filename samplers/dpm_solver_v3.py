"""DPM-Solver-v3: multistep predictor (orders 1-3), pseudo-order option and 0-NFE corrector.

Paper: Zheng, Lu, Chen, Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics" (NeurIPS 2023, arXiv 2310.13268; official code thu-ml/DPM-Solver-v3). The statistics
(EMS) and their integrals live in ``dpm_solver_v3_ems``.

In the VE form (x = x_ve, lambda = log(alpha/s), dx/dlambda = D - x) with f = (1 - l) x - D and
g = e^{S_s - S} f - int_{lambda_s}^{lambda} e^{S_s - S_r} b_r dr (paper eqs. 8-12), one step from
s to t with g approximated by its Taylor polynomial G of degree n - 1 around lambda_s is

    x_t = e^{-(L_t - L_s)} x_s - int_{lambda_s}^{lambda_t} e^{L - L_t} [ e^{S - S_s} G(lambda) + Phi(lambda) ] dlambda,
    Phi(lambda) = int_{lambda_s}^{lambda} e^{S_lambda - S_r} b_r dr                     (paper eq. 14)

The derivatives of g come from the cached earlier points: an interpolating polynomial (Vandermonde,
paper eq. 13) or, with ``pseudo``, divided differences that use only the k+1 newest points for
the k-th derivative (eqs. 15-16). The corrector redoes the previous step with the new model output
included (order + 1 with ``corrector_pseudo``, as the official code), at no extra NFE; ``half``
restricts it to the low-noise half (sigma below ``corrector_sigma_max``), recommended by the paper
at large CFG and 5-6 NFE. Orders ramp up from 1 as points accumulate; ``lower_order_final`` caps
the last steps (the official code's default).

Departures: the step to sigma = 0 returns the last denoised estimate (as ComfyUI's dpmpp_2m);
sigmas are used as given (the official code snaps them to the EMS grid); from a flow model's
sigma = 1 (alpha = 0, lambda = -inf) the first step is DDIM, the limit of the first-order v3 step
as l -> 1 and s, b -> 0 at infinite noise, and that point is not used for later derivatives. With degenerate statistics
(l = 1, s = b = 0) order 1 is DDIM and order 2 is DPM-Solver++(2M) in its Taylor form.
"""
from __future__ import annotations

import torch

from .common import SamplerInputError, alpha_s, check_inputs, check_range, precise, report, resolve_kind
from .dpm_solver_v3_ems import EMS


class _Stepper:
    """The v3 update from a base point s to lambda_t, given the cached (lambda_i, f_i)."""

    def __init__(self, ems: EMS):
        self.ems = ems

    def g_values(self, lam_s, S_s, points):
        """g_i relative to base s for cached points [(lambda_i, f_i), ...] (base first)."""
        lams = torch.tensor([p[0] for p in points], dtype=torch.float64)
        _, _, _, _, S = self.ems.at(lams)
        psi = self.ems.psi(lam_s, S_s, lams)
        return [torch.exp(S_s - S[i]).to(f) * f - psi[i].to(f) for i, (_, f) in enumerate(points)]

    @staticmethod
    def derivatives(deltas, diffs, pseudo):
        """Taylor coefficients g^(k)/k! (k = 1..n-1) from g_i - g_s at lambda_i - lambda_s."""
        n = len(deltas)
        if n == 0:
            return []
        if not pseudo:
            vander = torch.tensor([[d ** k for k in range(1, n + 1)] for d in deltas], dtype=torch.float64)
            inv = torch.linalg.inv(vander)
            return [sum(inv[k, j] * diffs[j] for j in range(n)) for k in range(n)]
        # divided differences over (0, g_s=0), (delta_1, diff_1), ... newest first
        xs = [0.0] + list(deltas)
        table = [torch.zeros_like(diffs[0])] + list(diffs)
        coefs = []
        for k in range(1, n + 1):
            table = [(table[j] - table[j + 1]) / (xs[j] - xs[j + k]) for j in range(len(table) - 1)]
            coefs.append(table[0])          # k-th divided difference = g^(k)/k! (pseudo)
        return coefs

    def step(self, x_s, lam_s, lam_t, points, order, pseudo):
        """x_t from base x_s with ``order`` cached points (base first), all in VE form (float64)."""
        ems = self.ems
        ls = torch.tensor([lam_s], dtype=torch.float64)
        _, _, _, L_s, S_s = (t[0] for t in ems.at(ls))
        gs = self.g_values(lam_s, S_s, points[:order])
        coefs = [gs[0]] + self.derivatives([points[i][0] - lam_s for i in range(1, order)],
                                           [gs[i] - gs[0] for i in range(1, order)], pseudo)
        nodes, w, psi = ems.nodes_with_psi(lam_s, lam_t, S_s)
        _, _, _, L, S = ems.at(nodes)
        L_t = ems.at(torch.tensor([lam_t], dtype=torch.float64))[3][0]
        view = (-1,) + (1,) * len(ems.shape)
        wv = w.view(view)
        base = torch.exp(L - L_t + S - S_s) * wv            # (M, *stat)
        phi = torch.exp(S - S_s) * psi
        integral = (torch.exp(L - L_t) * wv * phi).sum(0).to(x_s)   # statistics only: broadcast over the batch
        delta = (nodes - lam_s).view(view)
        for k, c in enumerate(coefs):
            integral = integral + (base * delta**k).sum(0).to(x_s) * c
        return torch.exp(-(L_t - L_s)).to(x_s) * x_s - integral


def _lambdas(sigmas64: torch.Tensor, kind: str) -> torch.Tensor:
    a, s = alpha_s(sigmas64, kind)
    return torch.log(a) - torch.log(s)


@torch.no_grad()
def sample_dpm_solver_v3(model, x, sigmas, extra_args=None, callback=None, disable=None, ems=None,
                         order=2, pseudo=False, corrector=True, corrector_pseudo=True,
                         corrector_sigma_max=None, lower_order_final=True, kind=None):
    """DPM-Solver-v3 with empirical model statistics ``ems`` (None: degenerate = DPM-Solver++)."""
    check_range("order", order, 1, 3)
    if int(order) != order:
        raise SamplerInputError(f"order must be 1, 2 or 3, got {order!r}")
    extra_args = {} if extra_args is None else extra_args
    kind = resolve_kind(model, kind)
    check_inputs(x, sigmas, kind)
    calibrated = ems is not None
    ems = EMS.degenerate(shape=(1,) * (x.ndim - 1)) if ems is None else ems
    if len(ems.shape) > x.ndim - 1 or any(e not in (1, d) for e, d in zip(ems.shape[::-1], x.shape[::-1])):
        raise SamplerInputError(f"EMS of shape {ems.shape} do not fit latents of shape {tuple(x.shape[1:])}: "
                                "calibrate at this resolution or with per-channel statistics")
    sig = sigmas.detach().to("cpu", torch.float64)
    a, s = alpha_s(sig, kind)
    lam = _lambdas(sig, kind)
    work = precise(x)
    stepper = _Stepper(ems)
    s_in = x.new_ones([x.shape[0]])
    steps = len(sig) - 1
    xs = x.to(work)                              # sampler-space state
    cache = []                                   # [(lambda_i, f_i)] of the VE form, newest first
    prev = None                                  # (x_ve base, lambda base, order) of the last predictor
    for i in range(steps):
        denoised = model(xs.to(x.dtype), sigmas[i] * s_in, **extra_args)
        report(callback, xs.to(x.dtype), i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            return denoised
        if float(a[i]) == 0.0:                   # flow model at sigma = 1: DDIM from pure noise
            xs = float(a[i + 1]) * denoised.to(work) + float(s[i + 1]) * xs
            continue
        xv = xs / float(a[i])
        lam_i = float(lam[i])
        l_i = ems.at(torch.tensor([lam_i], dtype=torch.float64))[0][0].to(xv)   # tables stay on the CPU
        f_i = (1 - l_i) * xv - denoised.to(work)
        if corrector and prev is not None:       # redo the previous step with this new output
            x_base, lam_base, p_order = prev
            c_order = min(p_order + (1 if corrector_pseudo else 0), len(cache) + 1)
            if c_order > 1 and (corrector_sigma_max is None or float(s[i] / a[i]) <= corrector_sigma_max):
                points = [cache[0], (lam_i, f_i)] + cache[1:]
                xv = stepper.step(x_base, lam_base, lam_i, points, c_order, corrector_pseudo).to(work)
        cache = [(lam_i, f_i)] + cache[:2]
        p_order = min(len(cache), int(order))
        if lower_order_final:
            p_order = min(p_order, steps - i)
        x_base = xv
        xv = stepper.step(x_base, lam_i, float(lam[i + 1]), cache, p_order, pseudo)
        prev = (x_base, lam_i, p_order)
        xs = (xv * float(a[i + 1])).to(work)
        if calibrated and not bool(torch.isfinite(xs).all()):
            raise SamplerInputError(f"DPM-Solver-v3: the sample became inf / NaN at step {i + 1} of {steps}: the "
                                    "statistics do not fit these sigmas (calibrated on too few samples or grid "
                                    "points?); calibrate with more samples, or set the corrector off")
    return xs.to(x.dtype)
