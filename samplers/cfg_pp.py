"""CFG++ (manifold-constrained classifier-free guidance) for the pack's solvers.

Paper: Chung, Kim, Park, Nam, Ye, "CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models" (ICLR 2025, arXiv 2406.08070; official code CFGpp-diffusion/CFGpp).

CFG++ guides the data prediction with a small scale lambda in [0, 1] but renoises with the
*unconditional* noise estimate. In the VE form (x = x0 + sigma n, ComfyUI's eps/v models), with
D_lam = D_u + lam (D_c - D_u) and eps_u = (x - D_u) / sigma, DDIM/Euler CFG++ is (paper Alg. 1)

    x' = D_lam + sigma' eps_u                                   (VE)

Rectified flow (ComfyUI CONST, x = (1 - sigma) x0 + sigma n): the same rule in the model's own
variables, eps_u = (x - (1 - sigma) D_u) / sigma, is

    x' = (1 - sigma') D_lam + sigma' eps_u                      (flow, exact)

which is the VE rule applied to x_ve = x / (1 - sigma), sigma_ve = sigma / (1 - sigma). The VE
formula applied literally to flow sigmas, x' = D_lam + sigma' (x - D_u) / sigma, differs from it by
exactly sigma' lam (D_c - D_u) (expand both: the literal form lacks the -sigma' D_lam and has
+sigma' D_u), so the flow form is used here, through ``alpha_s`` of ``samplers.common``.

One rule generalises CFG++ to every multistep / predictor-corrector solver. At step i the solver's
*base point* is renoised with the unconditional noise:

    x~_i = alpha_i D_lam,i + s_i eps_u,i = x_i + alpha_i (D_lam,i - D_u,i)

and the base solver step is taken from x~_i with D_lam,i as the current data prediction, while every
*other* point of its stencil (earlier outputs, corrector points) contributes its unconditional
output D_u,j (equivalently eps_u,j for solvers that store noise estimates: eps~_i = eps_u,i). For
DPM-Solver++(2M) this is exactly the official ``dpm++_2m_cfg++`` (which stores the unconditional
D as ``old_denoised``) and ComfyUI's ``sample_dpmpp_2m_cfg_pp``; for Euler it is
``sample_euler_cfg_pp``; with D_c = D_u (or lam = 0) every solver is its base solver bit for bit.

Interface (pure: no ComfyUI import). Each ``sample_<solver>_cfg_pp(model, x, sigmas, extra_args,
callback, disable, uncond=..., **solver options)`` takes ComfyUI's ``model`` returning the *guided*
D_lam and ``uncond``, a callable returning the unconditional prediction D_u of the most recent
``model`` call (the nodes layer fills it from a post-CFG function, with ComfyUI's cfg-1
optimisation disabled, as core does; ``GuidedPair`` builds both from two denoisers for the tests
and the benchmark). It may return None where no unconditional prediction exists: that raises
``MissingUncondError``. The guidance scale is the caller's CFG scale: lam = cfg.

Departures: heun-style 2-stage solvers are not offered (the second stage would evaluate a guided
prediction the rule never uses). A flow model's sigma = 1 step is the exact Euler CFG++ step
(alpha = 0: eps_u = x). DC-Solver's dynamic compensation is not applied (UniPC only).
"""
from __future__ import annotations

import math

import torch

from .common import SamplerInputError, alpha_s, check_inputs, check_range, half_log_snr, precise, report, resolve_kind
from .dc_solver import UniPCState
from .dpm_solver_v3 import _Stepper
from .dpm_solver_v3_ems import EMS
from .momentum import MAX_ORDER, _ve_step, ab_mix, split_order
from .time_shift import _bcast, _evaluate
from .time_shift import _setup as _ts_setup


class MissingUncondError(RuntimeError):
    """The sampler got no unconditional prediction (no negative prompt / no CFG pass)."""


class GuidedPair:
    """CFG from two denoisers with the unconditional side channel CFG++ reads: ``pair(x, sigma)``
    returns D_u + scale (D_c - D_u); ``pair.uncond()`` the D_u of the last call."""

    def __init__(self, cond_model, uncond_model, scale):
        self.cond_model, self.uncond_model, self.scale = cond_model, uncond_model, float(scale)
        self.model_sampling = getattr(cond_model, "model_sampling", None)
        self.last = None

    def __call__(self, x, sigma, **extra_args):
        d_c = self.cond_model(x, sigma, **extra_args)
        self.last = self.uncond_model(x, sigma, **extra_args)
        return self.last + self.scale * (d_c - self.last)

    def uncond(self):
        return self.last


class _Eval:
    """(D_lam, D_u) for one model call."""

    def __init__(self, model, uncond, extra_args):
        if not callable(uncond):
            raise SamplerInputError("CFG++ samplers need uncond=<callable returning the unconditional prediction>")
        self.model, self.uncond, self.extra_args = model, uncond, extra_args

    def pair(self, d_lam):
        d_u = self.uncond()
        if d_u is None:
            raise MissingUncondError(
                "CFG++ needs the unconditional (negative-prompt) prediction, but this sampling pass has none: "
                "connect a negative prompt (an empty one is fine) and use CFGGuider / KSampler, not BasicGuider")
        return d_lam, d_u.to(d_lam)

    def __call__(self, x, sigma):
        return self.pair(self.model(x, sigma, **self.extra_args))


def renoise(x, alpha, d_lam, d_u):
    """x~ = alpha D_lam + s eps_u = x + alpha (D_lam - D_u): the state CFG++ steps from."""
    return x + alpha * (d_lam - d_u)


def _setup(model, x, sigmas, extra_args, kind, uncond):
    extra_args = {} if extra_args is None else extra_args
    kind = resolve_kind(model, kind)
    check_inputs(x, sigmas, kind)
    sig64 = sigmas.detach().to("cpu", torch.float64)
    a, s = alpha_s(sig64, kind)
    return _Eval(model, uncond, extra_args), kind, a.to(x), s.to(x), half_log_snr(sig64, kind), x.new_ones([x.shape[0]])


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None, kind=None):
    """DDIM / Euler CFG++ (paper Alg. 1; exact for flow models)."""
    ev, kind, a, s, _, s_in = _setup(model, x, sigmas, extra_args, kind, uncond)
    for i in range(len(sigmas) - 1):
        d_lam, d_u = ev(x, sigmas[i] * s_in)
        report(callback, x, i, sigmas[i], d_lam)
        if sigmas[i + 1] == 0:
            return d_lam
        x = a[i + 1] * d_lam + s[i + 1] * (x - a[i] * d_u) / s[i]
    return x


@torch.no_grad()
def sample_plms_hb_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None,
                          order=4, beta=0.9, kind=None):
    """PLMS + heavy ball CFG++: Adams-Bashforth on the unconditional noise estimates from x~."""
    check_range("order", order, 1, MAX_ORDER)
    if int(order) != order:
        raise SamplerInputError(f"order must be a whole number for PLMS, got {order!r} (GHVB takes fractions)")
    check_range("beta", beta, 0.01, 1.0)
    ev, kind, a, s, _, s_in = _setup(model, x, sigmas, extra_args, kind, uncond)
    eps_hist, v = [], None
    for i in range(len(sigmas) - 1):
        d_lam, d_u = ev(x, sigmas[i] * s_in)
        report(callback, x, i, sigmas[i], d_lam)
        e = (x - a[i] * d_u) / s[i]                       # eps_u = eps of x~ under D_lam
        eps_hist = [e] + eps_hist[: int(order) - 1]
        e_hat = ab_mix(eps_hist, int(order))
        v = e_hat if v is None else (1.0 - beta) * v + beta * e_hat
        x = _ve_step(e, v, d_lam, a[i], s[i], a[i + 1], s[i + 1], i == 0)
    return x


@torch.no_grad()
def sample_plms_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None, order=4,
                       kind=None):
    """PLMS (fixed-coefficient Adams-Bashforth, iPNDM-style) CFG++."""
    return sample_plms_hb_cfg_pp(model, x, sigmas, extra_args, callback, disable, uncond, order=order, beta=1.0,
                                 kind=kind)


@torch.no_grad()
def sample_ghvb_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None, order=3.5,
                       kind=None):
    """GHVB CFG++: momentum on the unconditional noise estimates, stepped from x~."""
    k, beta = split_order(order)
    ev, kind, a, s, _, s_in = _setup(model, x, sigmas, extra_args, kind, uncond)
    v_hist = []
    for i in range(len(sigmas) - 1):
        d_lam, d_u = ev(x, sigmas[i] * s_in)
        report(callback, x, i, sigmas[i], d_lam)
        e = (x - a[i] * d_u) / s[i]
        v = e if not v_hist else (1.0 - beta) * v_hist[0] + beta * e
        v_hist = [v] + v_hist[: k - 1]
        x = _ve_step(e, ab_mix(v_hist, k, beta), d_lam, a[i], s[i], a[i + 1], s[i + 1], i == 0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_hb_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None,
                              beta=0.8, kind=None):
    """DPM-Solver++(2M) (+ heavy ball) CFG++; beta = 1 is the official dpm++_2m_cfg++ (exact for flow)."""
    check_range("beta", beta, 0.01, 1.0)
    ev, kind, a, s, lam, s_in = _setup(model, x, sigmas, extra_args, kind, uncond)
    steps = len(sigmas) - 1
    old_u, v = None, None
    for i in range(steps):
        d_lam, d_u = ev(x, sigmas[i] * s_in)
        report(callback, x, i, sigmas[i], d_lam)
        if sigmas[i + 1] == 0:
            return d_lam
        h = float(lam[i + 1] - lam[i])
        if old_u is None:
            d = d_lam
        else:
            r = float(lam[i] - lam[i - 1]) / h
            d2 = d_lam + (d_lam - old_u) / (2.0 * r)
            v = d2 if v is None else (1.0 - beta) * v + beta * d2
            d = v
        ratio = float((s[i + 1] / s[i]) * (a[i] / a[i + 1])) if float(a[i]) > 0 else 0.0   # e^{-h}
        x = (s[i + 1] / s[i]) * renoise(x, a[i], d_lam, d_u) + a[i + 1] * (1.0 - ratio) * d
        old_u = d_u
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None, kind=None):
    """DPM-Solver++(2M) CFG++ (official dpm++_2m_cfg++; ComfyUI's dpmpp_2m_cfg_pp for eps/v models)."""
    return sample_dpmpp_2m_hb_cfg_pp(model, x, sigmas, extra_args, callback, disable, uncond, beta=1.0, kind=kind)


@torch.no_grad()
def sample_ts_ddim_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None,
                          window=80, cutoff=300, data_variance=0.0, sigma_table=None, kind=None):
    """Time-Shift DDIM CFG++: the shifted evaluation's unconditional noise renoises."""
    extra_args, kind, shifter, sig = _ts_setup(model, x, sigmas, extra_args, kind, window, cutoff, data_variance,
                                               sigma_table)
    ev = _Eval(model, uncond, extra_args)
    for i in range(len(sig) - 1):
        x_tau, tau, d_lam = _evaluate(model, x, i, sig, shifter, extra_args)
        d_lam, d_u = ev.pair(d_lam)
        report(callback, x, i, sigmas[i], d_lam)
        if sig[i + 1] == 0:
            return d_lam
        a_t, s_t = alpha_s(tau, kind)
        a_n, s_n = alpha_s(sig[i + 1], kind)
        noise = (x_tau - _bcast(a_t, x) * d_u) / _bcast(s_t, x)
        x = float(a_n) * d_lam + float(s_n) * noise
    return x


@torch.no_grad()
def sample_ts_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None,
                              window=30, cutoff=300, data_variance=0.0, sigma_table=None, kind=None):
    """Time-Shift DPM-Solver++(2M) CFG++."""
    extra_args, kind, shifter, sig = _ts_setup(model, x, sigmas, extra_args, kind, window, cutoff, data_variance,
                                               sigma_table)
    ev = _Eval(model, uncond, extra_args)
    old_u, old_lam = None, None
    for i in range(len(sig) - 1):
        x_tau, tau, d_lam = _evaluate(model, x, i, sig, shifter, extra_args)
        d_lam, d_u = ev.pair(d_lam)
        report(callback, x, i, sigmas[i], d_lam)
        if sig[i + 1] == 0:
            return d_lam
        lam, lam_next = half_log_snr(tau, kind), half_log_snr(sig[i + 1], kind)
        h = lam_next - lam
        a_t, s_t = alpha_s(tau, kind)
        a_n, s_n = alpha_s(sig[i + 1], kind)
        d = d_lam
        if old_u is not None:
            r = (lam - old_lam) / h
            ok = torch.isfinite(r) & (r > 0)
            corr = torch.where(ok, 0.5 / torch.where(ok, r, torch.ones_like(r)), torch.zeros_like(r))
            d = d_lam + (d_lam - old_u) * _bcast(corr, x)
        e_neg_h = torch.where(a_t > 0, (s_n / s_t) * (a_t / a_n), torch.zeros_like(a_t))
        x_base = renoise(x_tau, _bcast(a_t, x), d_lam, d_u)
        x = _bcast(s_n / s_t, x) * x_base + _bcast(a_n * (1.0 - e_neg_h), x) * d
        old_u, old_lam = d_u, lam
    return x


@torch.no_grad()
def sample_uni_pc_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None,
                         order=2, variant="bh2", kind=None):
    """UniPC (DC-Solver's predictor-corrector without compensation) CFG++: the corrector of step i-1
    -> i redoes it from x~_{i-1} with the new point's unconditional output."""
    check_range("order", order, 1, 3)
    if variant not in ("bh1", "bh2"):
        raise SamplerInputError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    ev, kind, a, _, lam, s_in = _setup(model, x, sigmas, extra_args, kind, uncond)
    state = UniPCState(model, x, sigmas, ev.extra_args, kind, int(order), variant)   # its tables and update
    steps = len(sigmas) - 1
    ms_u, lams_h, prev = [], [], None
    for i in range(steps):
        d_lam, d_u = ev(x, sigmas[i] * s_in)
        report(callback, x, i, sigmas[i], d_lam)
        if sigmas[i + 1] == 0:
            return d_lam
        if prev is not None and 1 < i < steps:                            # UniC on x_i
            ms_p, lams_p, x_b, o = prev
            x = state._update(i - 1, d_u, o, ms_p, lams_p, x_b)
        ms, lams = [d_lam] + ms_u[:2], [float(lam[i])] + lams_h[:2]
        o = min(int(order), len(ms), steps - i)
        x_b = renoise(x, a[i], d_lam, d_u)
        x = state._update(i, None, o, ms, lams, x_b)
        prev = (ms, lams, x_b, o)
        ms_u, lams_h = [d_u] + ms_u[:2], lams
        if not math.isfinite(lams[0]):                                    # flow sigma = 1: no interpolation node
            ms_u, lams_h = [], []
    return x


@torch.no_grad()
def sample_dpm_solver_v3_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, uncond=None,
                                ems=None, order=2, pseudo=False, corrector=True, corrector_pseudo=True,
                                corrector_sigma_max=None, lower_order_final=True, kind=None):
    """DPM-Solver-v3 CFG++: base f~_i = (1 - l) x~_i - D_lam,i, cached f_u,j = (1 - l) x_j - D_u,j."""
    check_range("order", order, 1, 3)
    if int(order) != order:
        raise SamplerInputError(f"order must be 1, 2 or 3, got {order!r}")
    ev, kind, _, _, _, s_in = _setup(model, x, sigmas, extra_args, kind, uncond)
    ems = EMS.degenerate(shape=(1,) * (x.ndim - 1)) if ems is None else ems
    if len(ems.shape) > x.ndim - 1 or any(e not in (1, d) for e, d in zip(ems.shape[::-1], x.shape[::-1])):
        raise SamplerInputError(f"EMS of shape {ems.shape} do not fit latents of shape {tuple(x.shape[1:])}")
    sig = sigmas.detach().to("cpu", torch.float64)
    a, s = alpha_s(sig, kind)
    lam = half_log_snr(sig, kind)
    work, stepper, steps = precise(x), _Stepper(ems), len(sig) - 1
    xs, cache, prev = x.to(work), [], None
    for i in range(steps):
        d_lam, d_u = ev(xs.to(x.dtype), sigmas[i] * s_in)
        report(callback, xs.to(x.dtype), i, sigmas[i], d_lam)
        if sig[i + 1] == 0:
            return d_lam
        d_lam, d_u = d_lam.to(work), d_u.to(work)
        if float(a[i]) == 0.0:                   # flow model at sigma = 1: Euler CFG++ (eps_u = x)
            xs = float(a[i + 1]) * d_lam + float(s[i + 1]) * xs
            continue
        xv = xs / float(a[i])
        lam_i = float(lam[i])
        l_i = ems.at(torch.tensor([lam_i], dtype=torch.float64))[0][0].to(xv)
        f_u = (1 - l_i) * xv - d_u
        f_t = (1 - l_i) * renoise(xv, 1.0, d_lam, d_u) - d_lam
        if corrector and prev is not None:
            x_base, lam_base, p_order, f_base = prev
            c_order = min(p_order + (1 if corrector_pseudo else 0), len(cache) + 1)
            if c_order > 1 and (corrector_sigma_max is None or float(s[i] / a[i]) <= corrector_sigma_max):
                points = [(lam_base, f_base), (lam_i, f_u)] + cache[1:]
                xv = stepper.step(x_base, lam_base, lam_i, points, c_order, corrector_pseudo).to(work)
        cache = [(lam_i, f_u)] + cache[:2]
        p_order = min(len(cache), int(order))
        if lower_order_final:
            p_order = min(p_order, steps - i)
        x_base = renoise(xv, 1.0, d_lam, d_u)
        xv = stepper.step(x_base, lam_i, float(lam[i + 1]), [(lam_i, f_t)] + cache[1:], p_order, pseudo)
        prev = (x_base, lam_i, p_order, f_t)
        xs = (xv * float(a[i + 1])).to(work)
    return xs.to(x.dtype)


CFG_PP_SAMPLERS = {
    "euler": sample_euler_cfg_pp,
    "dpmpp_2m": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_hb": sample_dpmpp_2m_hb_cfg_pp,
    "plms": sample_plms_cfg_pp,
    "plms_hb": sample_plms_hb_cfg_pp,
    "ghvb": sample_ghvb_cfg_pp,
    "ts_ddim": sample_ts_ddim_cfg_pp,
    "ts_dpmpp_2m": sample_ts_dpmpp_2m_cfg_pp,
    "uni_pc": sample_uni_pc_cfg_pp,
    "dpm_solver_v3": sample_dpm_solver_v3_cfg_pp,
}
