"""DC-Solver: UniPC predictor-corrector with dynamic compensation of the stored model output.

Paper: Zhao, Wang, Wang, Lu, Zhou, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via
Dynamic Compensation" (ECCV 2024, arXiv 2409.03755; official code wl-zhao/DC-Solver).

Base: UniPC (Zhao et al. 2023) with data prediction in lambda = log(alpha/s): from t_k to t_{k+1},
h = lambda_{k+1} - lambda_k, with the stored outputs m (x0 predictions) and D_j = (m_{k-j} - m_k)/r_j,
r_j = (lambda_{k-j} - lambda_k)/h,

    predictor  x~_{k+1} = (s_{k+1}/s_k) x_k - alpha_{k+1} (e^{-h} - 1) m_k - alpha_{k+1} B(h) sum_j rho^p_j D_j
    corrector  x_{k+1}  = same with sum_{j<p} rho^c_j D_j + rho^c_p (m(x~_{k+1}) - m_k)

B(h) = -h (bh1) or e^{-h} - 1 (bh2); rho^p, rho^c solve UniPC's order conditions (rho^p = 1/2 at
order 2, rho^c = 1/2 at order 1). The corrector reuses the next step's model call (0 extra NFE)
and is skipped after the first step and at the end (the official SD setting).

Dynamic compensation (paper eq. 9): before each predictor step k >= 2 the newest stored output is
replaced by the Lagrange interpolation of the last three stored outputs (earlier ones already
compensated) at tau_k = t_{k-1} + rho_k (t_k - t_{k-1}); rho_k = 1 changes nothing.

Ratios rho are searched per step, greedily, against a fine-step reference trajectory on a few
samples (paper §3.3), and the cascade polynomial regression (CPR, §3.4) predicts them for unseen
step counts and CFG scales:  rho(step) = sum_{k<4} c_k (step/NFE)^k,  c_k = quadratic in CFG/12
whose coefficients are quadratic in NFE/50 (36 coefficients), rho = 1 for steps 1-2.

Departures: the interpolation variable is lambda rather than the model timestep (defined for every
model family; Lagrange weights are only invariant to affine changes of time); the per-step search
is derivative-free (golden-section on [0.5, 1.5], 1 NFE per trial; the paper back-propagates
through the network with AdamW); CPR is fitted by least squares on the searched grid.
"""
from __future__ import annotations

import math

import torch

from .common import SamplerInputError, alpha_s, check_inputs, check_range, half_log_snr, report, resolve_kind

RATIO_BOUNDS = (0.5, 1.5)   # the golden-section search interval of each ratio; CPR predictions are clamped to it


def _unipc_coefs(rks, h, order, variant):
    """(rho_predictor, rho_corrector, B(h)) for ``order`` with relative positions rks (newest past first)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    r_all = list(rks) + [1.0]
    rows, rhs = [], []
    h_phi_k, fact = h_phi_1 / hh - 1.0, 1.0
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in r_all])
        rhs.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
    if order == 1:
        rho_p, rho_c = [], [0.5]
    elif order == 2:
        rho_p, rho_c = [0.5], torch.linalg.solve(R, b).tolist()
    else:
        rho_p, rho_c = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist(), torch.linalg.solve(R, b).tolist()
    return rho_p, rho_c, b_h, h_phi_1


def lagrange(values, times, tau):
    """Lagrange interpolation of values at times, evaluated at tau."""
    out = torch.zeros_like(values[0])
    for a, (va, ta) in enumerate(zip(values, times)):
        w = 1.0
        for bi, tb in enumerate(times):
            if bi != a:
                w *= (tau - tb) / (ta - tb)
        out = out + w * va
    return out


class UniPCState:
    """Runs UniPC(+DC) one step at a time, so the search can try ratios step by step."""

    def __init__(self, model, x, sigmas, extra_args, kind, order, variant):
        self.model, self.extra_args, self.kind, self.order, self.variant = model, extra_args, kind, order, variant
        self.sig = sigmas
        sig64 = sigmas.detach().to("cpu", torch.float64)
        self.a, self.s = alpha_s(sig64, kind)
        self.lam = half_log_snr(sig64, kind)
        self.x, self.ms, self.lams = x, [], []
        self.s_in = x.new_ones([x.shape[0]])
        self.steps = len(sigmas) - 1
        self.last_order = None

    def evaluate(self, i, x):
        return self.model(x, self.sig[i] * self.s_in, **self.extra_args)

    def _update(self, i, m_new, order, ms, lams, x_base):
        """UniPC update from point i (base x_base, outputs ms newest first) to i + 1; with m_new: corrector."""
        h = float(self.lam[i + 1] - self.lam[i])
        if not math.isfinite(h):     # flow model at sigma = 1: DDIM (e^{-h} = 0)
            return float(self.a[i + 1]) * ms[0] + float(self.s[i + 1]) * x_base
        rks = [float(lams[j] - lams[0]) / h for j in range(1, order)]
        rho_p, rho_c, b_h, h_phi_1 = _unipc_coefs(rks, h, order, self.variant)
        d1s = [(ms[j] - ms[0]) / rks[j - 1] for j in range(1, order)]
        a_t, ratio = float(self.a[i + 1]), float(self.s[i + 1] / self.s[i])
        x = ratio * x_base - a_t * h_phi_1 * ms[0]
        if m_new is None:
            return x - a_t * b_h * sum(r * d for r, d in zip(rho_p, d1s)) if d1s else x
        res = sum(r * d for r, d in zip(rho_c[:-1], d1s)) if d1s else 0.0
        return x - a_t * b_h * (res + rho_c[-1] * (m_new - ms[0]))

    def step(self, i, rho=1.0, m=None):
        """Model output at point i (given or evaluated), corrector for i, compensation, predictor to i + 1."""
        m = self.evaluate(i, self.x) if m is None else m
        if self.last_order is not None and i > 1 and i < self.steps:     # UniC on x_i (not after step 1)
            base_i = i - 1
            self.x = self._update(base_i, m, self.last_order, self.ms, self.lams, self.x_prev)
        ms, lams = [m] + self.ms[:2], [float(self.lam[i])] + self.lams[:2]
        if rho != 1.0 and len(ms) == 3 and i >= 2:                      # dynamic compensation
            tau = lams[1] + rho * (lams[0] - lams[1])
            ms[0] = lagrange(ms, lams, tau)
        order = min(self.order, len(ms), self.steps - i)                # warm-up and lower_order_final
        self.x_prev = self.x
        self.x = self._update(i, None, order, ms, lams, self.x)
        self.ms, self.lams, self.last_order = ms, lams, order
        if not math.isfinite(lams[0]):          # a flow model's sigma = 1 is no interpolation node
            self.ms, self.lams = [], []
        return m


@torch.no_grad()
def sample_dc_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, ratios=None,
                     order=2, variant="bh2", kind=None):
    """UniPC-bh2 (order 2 by default) with dynamic compensation ratios (None or all 1: plain UniPC)."""
    check_range("order", order, 1, 3)
    if variant not in ("bh1", "bh2"):
        raise SamplerInputError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    kind = resolve_kind(model, kind)
    check_inputs(x, sigmas, kind)
    steps = len(sigmas) - 1
    ratios = [1.0] * steps if ratios is None else [float(r) for r in ratios]
    if len(ratios) < steps:
        raise SamplerInputError(f"{len(ratios)} compensation ratios for {steps} steps")
    state = UniPCState(model, x, sigmas, extra_args, kind, int(order), variant)
    for i in range(steps):
        if sigmas[i + 1] == 0:     # ComfyUI's convention: the last step to sigma 0 is the denoised estimate
            m = state.evaluate(i, state.x)
            report(callback, state.x, i, sigmas[i], m)
            return m
        m = state.step(i, ratios[i])
        report(callback, state.x_prev, i, sigmas[i], m)
    return state.x


def _golden(f, lo, hi, iters):
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    return (c, fc) if fc < fd else (d, fd)


def reference_points(model, x, sigmas, extra_args, kind, substeps=16, solver=None):
    """The ODE solution at every sigma of ``sigmas`` by a fine sub-stepped solve (DPM-Solver++(2M))."""
    from .momentum import sample_dpmpp_2m_hb

    out, xs = [x], x
    for i in range(len(sigmas) - 1):
        hi, lo = float(sigmas[i]), float(sigmas[i + 1])
        if lo == 0:
            out.append(model(xs, sigmas[i] * xs.new_ones([xs.shape[0]]), **extra_args))
            break
        fine = torch.exp(torch.linspace(math.log(hi), math.log(lo), substeps + 1, dtype=torch.float64)).to(sigmas)
        xs = sample_dpmpp_2m_hb(model, xs, fine, extra_args, beta=1.0, kind=kind)
        out.append(xs)
    return out


@torch.no_grad()
def search_ratios(model, x, sigmas, extra_args=None, kind=None, order=2, variant="bh2", iters=10,
                  bounds=RATIO_BOUNDS, substeps=16, progress=None):
    """Greedy per-step search of the compensation ratios against a fine reference (paper §3.3)."""
    extra_args = {} if extra_args is None else extra_args
    kind = resolve_kind(model, kind)
    check_inputs(x, sigmas, kind)
    steps = len(sigmas) - 1
    ref = reference_points(model, x, sigmas, extra_args, kind, substeps)
    state = UniPCState(model, x, sigmas, extra_args, kind, int(order), variant)
    ratios = [1.0] * steps
    for i in range(steps):
        if sigmas[i + 1] == 0:
            break
        m = state.evaluate(i, state.x)
        if i >= 2 and i + 1 < len(ref):
            saved = {k: getattr(state, k) for k in ("x", "ms", "lams", "last_order")} | {"x_prev": getattr(state, "x_prev", None)}

            def loss(rho, i=i, m=m, saved=saved):
                for k, v in saved.items():
                    setattr(state, k, v)
                state.step(i, rho, m)
                x_next = state.x
                if i + 1 < steps and sigmas[i + 2] != 0:       # include the next corrector, as the paper
                    m_next = state.evaluate(i + 1, x_next)
                    x_next = state._update(i, m_next, state.last_order, state.ms, state.lams, state.x_prev)
                return float((x_next - ref[i + 1]).pow(2).mean())

            ratios[i], _ = _golden(loss, bounds[0], bounds[1], iters)
            for k, v in saved.items():
                setattr(state, k, v)
        state.step(i, ratios[i], m)
        if progress:
            progress(i + 1, steps)
    return ratios


def cpr_features(nfe: int, cfg: float, step: int) -> torch.Tensor:
    """The 36 products of the cascade: (step/NFE)^k (CFG/12)^j (NFE/50)^m, k<4, j<3, m<3."""
    n, g, x = nfe / 50.0, cfg / 12.0, step / nfe
    return torch.tensor([x**k * g ** (2 - j) * n ** (2 - m) for k in range(4) for j in range(3) for m in range(3)],
                        dtype=torch.float64)


def cpr_ratios(coefs: torch.Tensor, nfe: int, cfg: float, bounds=RATIO_BOUNDS) -> list:
    """Ratios for an unseen (NFE, CFG) from the 36 CPR coefficients; rho = 1 for steps 1-2.

    Departure from the paper: predictions are clamped to the search interval ``bounds``. The cubic
    polynomial is unconstrained and, far outside the searched NFE / CFG grid, predicts ratios such as
    0.07 or -3 that extrapolate the stored model output far beyond its two neighbours."""
    lo, hi = bounds
    return [1.0 if step < 3 else min(hi, max(lo, float(cpr_features(nfe, cfg, step) @ coefs)))
            for step in range(1, nfe + 1)]


def cpr_fit(searched: dict) -> torch.Tensor:
    """Least-squares CPR coefficients from {(nfe, cfg): ratios} (steps >= 3, 1-based)."""
    rows, target = [], []
    for (nfe, cfg), ratios in searched.items():
        for step in range(3, nfe + 1):
            rows.append(cpr_features(nfe, cfg, step))
            target.append(ratios[step - 1])
    A, y = torch.stack(rows), torch.tensor(target, dtype=torch.float64)
    return torch.linalg.lstsq(A, y[:, None], driver="gelsd").solution[:, 0]
