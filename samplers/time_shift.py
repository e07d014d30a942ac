"""Time-Shift sampler (TS-DDIM, TS-DPM-Solver++(2M)) against exposure bias.

Paper: Li, Qu, Zhang, Huang, Van Gool, "Alleviating Exposure Bias in Diffusion Models through
Sampling with Shifted Time Steps" (ICLR 2024, arXiv 2305.15583; official code Mingxiao-Li/TS-DPM).

During sampling the state x at the nominal noise level drifts from the forward-process marginal,
so the network is asked about a time it does not look like. At each step after the first, while
the nominal model timestep t is above the cutoff, the sampler measures the per-sample variance of
what the network sees, v = Var(c_in(sigma) * x) over all elements (unbiased), and picks from the
window of the model's own discrete timesteps around t, [t - w//2, t + w//2], the one whose expected
variance is closest (ties go to the less noisy one):

    tau = argmin_tau | v - c_in(tau)^2 (alpha_tau^2 v0 + s_tau^2) |^2

The official statistic is 1 - abar_tau, i.e. v0 = 0 (``data_variance``); v0 > 0 removes its
bias for data whose per-sample element variance is v0 (see docs). The network then evaluates the
same input as if it were at tau (in sampler space x' = x c_in(sigma) / c_in(tau)) and the step
starts from tau (paper Fig. 1: the shifted time is the network's time):

* TS-DDIM:   x_next = alpha_next D_tau + s_next (x' - alpha_tau D_tau) / s_tau
* TS-DPM-Solver++(2M): the data-prediction multistep update from lambda(tau) to the next nominal
  lambda; tau also enters the step ratio r of the following step, as the official DPM-Solver
  variant feeds the shifted time forward.

Departures: the official DPM-Solver variant is the noise-prediction DPM-Solver-2 and measures the
variance of the noise estimate; here it is DPM-Solver++(2M) (what ComfyUI users run) with the
variance of the state, as in the paper. Windows and cutoffs are in units of a 1000-step model
clock and scaled for models whose sigma table has another length (Flux: 10000). Rectified-flow
models use c_in = 1, alpha = 1 - sigma, s = sigma (derived, not in the paper).
"""
from __future__ import annotations

import torch

from .common import (SamplerInputError, _model_sampling, alpha_s, at_step, check_inputs, check_range,
                     half_log_snr, precise, report, resolve_kind)


def _c_in(sigma, kind, sigma_data):
    return torch.ones_like(sigma) if kind == "flow" else (sigma**2 + sigma_data**2) ** -0.5


class Shifter:
    """Chooses the shifted noise level per sample; window 0 or a cutoff above t means no shift."""

    def __init__(self, model, kind, window, cutoff, data_variance, sigma_table=None, sigma_data=None):
        check_range("window", window, 0, 1000)
        check_range("cutoff", cutoff, 0, 1000)
        check_range("data_variance", data_variance, 0.0, 10.0)
        ms = _model_sampling(model)
        if sigma_table is None:
            sigma_table = getattr(ms, "sigmas", None)
        if sigma_table is None:
            raise SamplerInputError("the time-shift sampler needs the model's sigma table (sigma_table option)")
        self.table = torch.as_tensor(sigma_table).detach().to("cpu", torch.float64).flatten()
        if self.table.numel() < 2 or (self.table[1:] <= self.table[:-1]).any():
            raise SamplerInputError("sigma_table must be the model's ascending table of sigmas")
        scale = self.table.numel() / 1000.0
        self.half = int(round(int(window) // 2 * scale))
        self.cutoff_index = int(round(cutoff * scale))
        self.kind, self.v0 = kind, float(data_variance)
        self.sigma_data = float(sigma_data if sigma_data is not None else getattr(ms, "sigma_data", 1.0))
        self.log_table = self.table.log()

    def index(self, sigma: float) -> int:
        return int((self.log_table - torch.tensor(sigma, dtype=torch.float64).log()).abs().argmin())

    def expected_variance(self, sigma):
        a, s = alpha_s(sigma, self.kind)
        return _c_in(sigma, self.kind, self.sigma_data) ** 2 * (a**2 * self.v0 + s**2)

    def choose(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Per-sample noise levels (float64, CPU) to evaluate the network at."""
        batch = x.shape[0]
        nominal = torch.full((batch,), sigma, dtype=torch.float64)
        t = self.index(sigma)
        if self.half == 0 or t <= self.cutoff_index:
            return nominal
        lo, hi = max(0, t - self.half), min(self.table.numel() - 1, t + self.half)
        cand = self.table[lo:hi + 1]
        seen = x.reshape(batch, -1).to(precise(x)) * float(_c_in(torch.tensor(sigma), self.kind, self.sigma_data))
        v = seen.var(dim=1, unbiased=True).cpu().double()
        j = ((v[:, None] - self.expected_variance(cand)[None]) ** 2).argmin(dim=1)
        return torch.where(lo + j == t, nominal, cand[j])   # the nominal slot keeps the exact sigma


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x).reshape(-1, *([1] * (x.ndim - 1)))


def _setup(model, x, sigmas, extra_args, kind, window, cutoff, data_variance, sigma_table):
    extra_args = {} if extra_args is None else extra_args
    kind = resolve_kind(model, kind)
    check_inputs(x, sigmas, kind)
    shifter = Shifter(model, kind, window, cutoff, data_variance, sigma_table)
    return extra_args, kind, shifter, sigmas.detach().to("cpu", torch.float64)


def _evaluate(model, x, i, sig, shifter, extra_args):
    """Shifted evaluation at step i: (x in tau's frame, tau per sample, D_tau)."""
    tau = shifter.choose(x, float(sig[i])) if i > 0 else torch.full((x.shape[0],), float(sig[i]), dtype=torch.float64)
    c_in = _c_in(torch.tensor(float(sig[i]), dtype=torch.float64), shifter.kind, shifter.sigma_data)
    x_tau = x * _bcast(c_in / _c_in(tau, shifter.kind, shifter.sigma_data), x)
    return x_tau, tau, model(x_tau, tau.to(x), **at_step(extra_args, sig[i]))


@torch.no_grad()
def sample_ts_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   window=80, cutoff=300, data_variance=0.0, sigma_table=None, kind=None):
    """DDIM (= Euler in sigma) whose network time is shifted to match the sample's variance."""
    extra_args, kind, shifter, sig = _setup(model, x, sigmas, extra_args, kind, window, cutoff,
                                            data_variance, sigma_table)
    for i in range(len(sig) - 1):
        x_tau, tau, denoised = _evaluate(model, x, i, sig, shifter, extra_args)
        report(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            break
        a_t, s_t = alpha_s(tau, kind)
        a_n, s_n = alpha_s(sig[i + 1], kind)
        noise = (x_tau - _bcast(a_t, x) * denoised) / _bcast(s_t, x)
        x = float(a_n) * denoised + float(s_n) * noise
    return x


@torch.no_grad()
def sample_ts_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None,
                       window=30, cutoff=300, data_variance=0.0, sigma_table=None, kind=None):
    """DPM-Solver++(2M) whose network time (and step start) is shifted per sample."""
    extra_args, kind, shifter, sig = _setup(model, x, sigmas, extra_args, kind, window, cutoff,
                                            data_variance, sigma_table)
    old_denoised, old_lam = None, None
    for i in range(len(sig) - 1):
        x_tau, tau, denoised = _evaluate(model, x, i, sig, shifter, extra_args)
        report(callback, x, i, sigmas[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            break
        lam = half_log_snr(tau, kind)
        lam_next = half_log_snr(sig[i + 1], kind)
        h = lam_next - lam                                   # (B,), +inf-safe below
        a_t, s_t = alpha_s(tau, kind)
        a_n, s_n = alpha_s(sig[i + 1], kind)
        d = denoised
        if old_denoised is not None:   # second order where the (possibly shifted) history is ordered
            r = (lam - old_lam) / h
            ok = torch.isfinite(r) & (r > 0)
            corr = torch.where(ok, 0.5 / torch.where(ok, r, torch.ones_like(r)), torch.zeros_like(r))
            d = denoised + (denoised - old_denoised) * _bcast(corr, x)
        e_neg_h = torch.where(a_t > 0, (s_n / s_t) * (a_t / a_n), torch.zeros_like(a_t))
        x = _bcast(s_n / s_t, x) * x_tau + _bcast(a_n * (1.0 - e_neg_h), x) * d
        old_denoised, old_lam = denoised, lam
    return x
