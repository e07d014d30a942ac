"""Heavy-ball momentum samplers: PLMS+HB, GHVB and DPM-Solver++(2M)+HB.

Paper: Wizadwongsa & Suwajanakorn, "Diffusion Sampling with Momentum for Mitigating Divergence
Artifacts" (arXiv 2307.11118; official code sWizad/momentum-diffusion).

The paper works with the VE form of the PF-ODE, dx/dsigma = e(x, sigma) with the noise estimate
e = (x - alpha*D) / s, on ComfyUI's sigma grid (x_ve = x / alpha, sigma_ve = s / alpha):

* AB_k^b, the modified Adams-Bashforth mixer (paper eqs. 15-19): in backward differences of the
  history u_0 (newest), u_1, ...:  AB_k^b(u) = sum_{j<k} (g_j + (1-b)/b * g_{j-1}) nabla^j u_0 with
  the Adams-Bashforth constants g = (1, 1/2, 5/12, 3/8, 251/720) and g_{-1} = 0. b = 1 gives AB_k.
  It uses fixed (uniform-step) coefficients, as the paper and its code do; while fewer than k
  values are stored the order is min(k, stored) (paper Algorithm 1).
* PLMS_k + HB:  v <- (1-beta) v + beta AB_k^1(e_n, e_{n-1}, ...);   x_ve <- x_ve + dsigma_ve v
* GHVB r:       v <- (1-beta) v + beta e_n;                        x_ve <- x_ve + dsigma_ve AB_k^beta(v_n, ...)
  where r = k - 1 + beta: a fractional r gives k = floor(r) + 1, beta = frac(r); an integer r gives
  k = r, beta = 1 (plain AB_k). v starts at e_0, so the first step is DDIM/Euler.
* DPM-Solver++(2M)+HB: v <- (1-beta) v + beta (D_n + (D_n - D_{n-1}) / (2 r_n)), then the data-
  prediction update x' = (s'/s) x + alpha' (1 - e^{-h}) v, with r_n = h_{n-1} / h_n in
  lambda = log(alpha/s). The first step is DDIM; v starts undamped at the first second-order step.

Claims (paper Theorems 1-2): HB makes any method first-order convergent; GHVB with integer
order k converges with order k; smaller beta enlarges the stability region.

Departures: the final step to sigma = 0 of DPM-Solver++(2M)+HB is x = D (as ComfyUI's dpmpp_2m; that
first-order last step is also what diffusers' lower_order_final, inherited by the official SD code, does
there). A schedule that ends above 0 (a SplitSigmas half, sampled on by another sampler) keeps second
order to its end, as ComfyUI's dpmpp_2m does. Flow (CONST) models run through the exact VE change of variables.
"""
from __future__ import annotations

import torch

from .common import SamplerInputError, alpha_s, check_inputs, check_range, half_log_snr, report, resolve_kind

AB_CONSTANTS = (1.0, 1.0 / 2.0, 5.0 / 12.0, 3.0 / 8.0, 251.0 / 720.0)
MAX_ORDER = len(AB_CONSTANTS)


def split_order(r: float) -> tuple[int, float]:
    """GHVB's momentum number r -> (AB order k, beta): 1.5 -> (2, 0.5); 2.0 -> (2, 1.0)."""
    check_range("order", r, 0.01, float(MAX_ORDER))
    k = int(r)
    frac = r - k
    if frac < 1e-9:
        return k, 1.0
    return k + 1, frac


def ab_mix(history: list[torch.Tensor], k: int, b: float = 1.0) -> torch.Tensor:
    """AB_k^b of a history (newest first), at order min(k, len(history))."""
    order = min(k, len(history))
    diffs = list(history[:order])           # nabla^0 u_i for i < order
    out = torch.zeros_like(diffs[0])
    for j in range(order):                  # diffs[0] now holds nabla^j u_0
        coef = AB_CONSTANTS[j] + ((1.0 - b) / b) * (AB_CONSTANTS[j - 1] if j > 0 else 0.0)
        out = out + coef * diffs[0]
        diffs = [diffs[i] - diffs[i + 1] for i in range(len(diffs) - 1)]
    return out


def _ve_step(e, u, denoised, a, s, a_next, s_next, first):
    """x_ve' = x_ve + (sigma_ve' - sigma_ve) u in ComfyUI's x, with e the current noise estimate:
    x' = a' D + s' u + a' (s / a) (e - u). On the first step u = e, which keeps alpha = 0 (a flow
    model at sigma = 1) exact and avoids dividing by a tiny alpha in low precision."""
    if first:
        return a_next * denoised + s_next * u
    return a_next * denoised + s_next * u + (a_next * s / a) * (e - u)


def _setup(model, x, sigmas, extra_args, kind):
    extra_args = {} if extra_args is None else extra_args
    kind = resolve_kind(model, kind)
    check_inputs(x, sigmas, kind)
    a, s = alpha_s(sigmas.detach().to("cpu", torch.float64), kind)   # float64 off-device (MPS has none)
    return extra_args, kind, a.to(x), s.to(x), x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_plms_hb(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   order=4, beta=0.9, kind=None):
    """PLMS (Adams-Bashforth, fixed coefficients) of ``order`` with heavy-ball momentum ``beta``."""
    check_range("order", order, 1, MAX_ORDER)
    if int(order) != order:
        raise SamplerInputError(f"order must be a whole number for PLMS, got {order!r} (GHVB takes fractions)")
    check_range("beta", beta, 0.01, 1.0)
    extra_args, kind, a, s, s_in = _setup(model, x, sigmas, extra_args, kind)
    eps_hist, v = [], None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, x, i, sigmas[i], denoised)
        e = (x - a[i] * denoised) / s[i]
        eps_hist = [e] + eps_hist[: int(order) - 1]
        e_hat = ab_mix(eps_hist, int(order))
        v = e_hat if v is None else (1.0 - beta) * v + beta * e_hat
        x = _ve_step(e, v, denoised, a[i], s[i], a[i + 1], s[i + 1], i == 0)
    return x


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, kind=None):
    """PLMS / Adams-Bashforth of ``order`` on the VE noise estimate (PLMS+HB at beta = 1)."""
    return sample_plms_hb(model, x, sigmas, extra_args, callback, disable, order=order, beta=1.0, kind=kind)


@torch.no_grad()
def sample_ghvb(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3.5, kind=None):
    """Generalized heavy ball of momentum number ``order`` = k - 1 + beta (paper Algorithm 2)."""
    k, beta = split_order(order)
    extra_args, kind, a, s, s_in = _setup(model, x, sigmas, extra_args, kind)
    v_hist = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, x, i, sigmas[i], denoised)
        e = (x - a[i] * denoised) / s[i]
        v = e if not v_hist else (1.0 - beta) * v_hist[0] + beta * e
        v_hist = [v] + v_hist[: k - 1]
        x = _ve_step(e, ab_mix(v_hist, k, beta), denoised, a[i], s[i], a[i + 1], s[i + 1], i == 0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_hb(model, x, sigmas, extra_args=None, callback=None, disable=None, beta=0.8, kind=None):
    """DPM-Solver++(2M) with heavy-ball momentum ``beta`` on its data-prediction estimate."""
    check_range("beta", beta, 0.01, 1.0)
    extra_args, kind, a, s, s_in = _setup(model, x, sigmas, extra_args, kind)
    lam = half_log_snr(sigmas.detach().to("cpu", torch.float64), kind)
    steps = len(sigmas) - 1
    old_denoised, v = None, None
    for i in range(steps):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            break
        h = float(lam[i + 1] - lam[i])
        if old_denoised is None:
            d = denoised
        else:
            r = float(lam[i] - lam[i - 1]) / h
            d2 = denoised + (denoised - old_denoised) / (2.0 * r)
            v = d2 if v is None else (1.0 - beta) * v + beta * d2
            d = v
        ratio = float((s[i + 1] / s[i]) * (a[i] / a[i + 1])) if float(a[i]) > 0 else 0.0   # e^{-h}
        x = (s[i + 1] / s[i]) * x + a[i + 1] * (1.0 - ratio) * d
        old_denoised = denoised
    return x
