"""Empirical model statistics (EMS) of DPM-Solver-v3: tables, their integrals, and their estimation.

Paper: Zheng, Lu, Chen, Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics" (NeurIPS 2023, arXiv 2310.13268; official code thu-ml/DPM-Solver-v3).

Everything is in the VE form of the model: x_ve = x / alpha, sigma_ve = s / alpha, lambda =
log(alpha / s) (ComfyUI's eps/v models have alpha = 1; flow models alpha = 1 - sigma), where the
PF-ODE is dx/dlambda = D - x. Per dimension and per lambda (paper eqs. 4-11, 56-63 in VE form):

    f  = (1 - l) x - D                       the part the solver treats as slowly varying
    l  = 1 - E[v * (dD/dx v)]                 Rademacher v (the diagonal of the Jacobian of D)
    f' = -l' x + (1 - l)(D - x) - D1,         D1 = dD/dlambda along the ODE
    s  = Cov(f, f') / Var(f),    b = E[f'] - s E[f]

l = 1, s = b = 0 ("degenerate") turns DPM-Solver-v3 into DPM-Solver++.

Departures from the official code: Jacobian-vector products are central finite differences
(works through any ComfyUI model and attention kernel; step 1e-3 relative), statistics may be
pooled over spatial positions (per channel, so one file serves every resolution), s is shrunk by
the R^2 of its regression (measured: at CFG 7.5 the raw estimates, |s| up to 9, made the
calibrated solver lose to DPM-Solver++ beyond 10 NFE; shrunk, it wins at every NFE), s is kept in
[S_MIN, S_MAX] = [-8, 0.5] (f tends to a constant at infinite noise and to 0 as the noise vanishes, so
a steep slope is an estimation artifact; a random tiny Flux calibrated on 8 samples gave s = +37 at
low noise, on 4 samples s = -27, which the steps multiply by e^{|s| h} into NaN samples; on the
analytic kit s stays in [-5, 0.4] and the bounds change nothing; the estimator bounds s before it
fits b, and EMS bounds tables loaded from older files; ``capped`` is the share of entries cut),
and the solver
integrates the piecewise-linear tables with Gauss-Legendre quadrature at any lambda instead of
snapping steps to the table grid (trapezoid sums).
"""
from __future__ import annotations

import numpy as np
import torch

from .common import SamplerInputError, alpha_s, precise

_GL_X, _GL_W = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(6))
MAX_PIECE = 0.5   # widest lambda interval one 6-point Gauss-Legendre rule integrates
S_MAX = 0.5       # largest growth rate of f per unit lambda the solver accepts (see the module docstring)
S_MIN = -8.0      # steepest decay accepted (the analytic kit's tables reach -5)


def _rule(edges: torch.Tensor):
    """Composite 6-point Gauss-Legendre nodes and weights on consecutive pieces ``edges``."""
    left, width = edges[:-1], edges[1:] - edges[:-1]
    return ((left[:, None] + width[:, None] * (_GL_X[None] + 1) / 2).flatten(),
            (width[:, None] * _GL_W[None] / 2).flatten())


class EMS:
    """Tables l, s, b on an ascending lambda grid; shape (N, *stat_shape), float64 on the CPU."""

    def __init__(self, lam, l, s, b):
        self.lam = torch.as_tensor(lam, dtype=torch.float64).flatten()
        self.l, self.s, self.b = (torch.as_tensor(t, dtype=torch.float64) for t in (l, s, b))
        n = self.lam.numel()
        if n < 2 or (self.lam[1:] <= self.lam[:-1]).any():
            raise SamplerInputError("EMS lambda grid must be ascending with at least 2 points")
        if not (self.l.shape == self.s.shape == self.b.shape and self.l.shape[0] == n):
            raise SamplerInputError(f"EMS tables must share shape (N={n}, ...), got {self.l.shape}, "
                                    f"{self.s.shape}, {self.b.shape}")
        if not all(torch.isfinite(t).all() for t in (self.l, self.s, self.b)):
            raise SamplerInputError("EMS tables contain NaN or infinity")
        self.capped = float(((self.s > S_MAX) | (self.s < S_MIN)).double().mean())
        self.s = self.s.clamp(S_MIN, S_MAX)
        steep = float(self.s.abs().max())       # pieces short enough that e^{-S} varies by at most e^2 on one
        self.piece = MAX_PIECE if steep <= 2.0 / MAX_PIECE else 2.0 / steep
        self.shape = tuple(self.l.shape[1:])
        h = self.lam[1:] - self.lam[:-1]
        view = (-1,) + (1,) * len(self.shape)
        # exact integrals of the piecewise-linear l and s at the grid nodes
        self._L = torch.cat([torch.zeros_like(self.l[:1]), torch.cumsum(h.view(view) * (self.l[1:] + self.l[:-1]) / 2, 0)])
        self._S = torch.cat([torch.zeros_like(self.s[:1]), torch.cumsum(h.view(view) * (self.s[1:] + self.s[:-1]) / 2, 0)])

    @classmethod
    def degenerate(cls, lam_min=-12.0, lam_max=12.0, shape=(1,)):
        """l = 1, s = b = 0: DPM-Solver++."""
        lam = torch.linspace(lam_min, lam_max, int((lam_max - lam_min) / MAX_PIECE) + 1, dtype=torch.float64)
        one = torch.ones((lam.numel(),) + tuple(shape), dtype=torch.float64)
        return cls(lam, one, torch.zeros_like(one), torch.zeros_like(one))

    def tensors(self) -> dict:
        return {"lambda": self.lam, "l": self.l, "s": self.s, "b": self.b}

    # -- evaluation at arbitrary lambda (constant continuation outside the grid) --------------------
    def _locate(self, lam: torch.Tensor):
        lam = lam.to(torch.float64)
        i = torch.clamp(torch.searchsorted(self.lam, lam, right=True) - 1, 0, self.lam.numel() - 2)
        t = lam - self.lam[i]
        h = self.lam[i + 1] - self.lam[i]
        return i, t, h

    def _interp(self, table, cum, lam):
        """(value, integral from grid start) of a piecewise-linear table at points lam (M,)."""
        i, t, h = self._locate(lam)
        view = (-1,) + (1,) * len(self.shape)
        lo, hi = table[i], table[i + 1]
        inside_lo, inside_hi = lam < self.lam[0], lam > self.lam[-1]
        w = (torch.clamp(t, min=0.0) / h).clamp(max=1.0).view(view)
        val = lo + w * (hi - lo)
        # integral: cum[i] + exact integral of the linear piece over [lam_i, lam] (clamped parts constant)
        tc = torch.clamp(t, min=0.0).clamp(max=h).view(view)
        integ = cum[i] + tc * lo + tc**2 * (hi - lo) / (2 * h.view(view))
        integ = integ + torch.where(inside_lo.view(view), t.view(view) * table[0], torch.zeros_like(integ))
        integ = integ + torch.where(inside_hi.view(view), (lam - self.lam[-1]).view(view) * table[-1],
                                    torch.zeros_like(integ))
        return val, integ

    def at(self, lam: torch.Tensor):
        """l, s, b, L, S at points lam (M,): each (M, *stat_shape)."""
        l, L = self._interp(self.l, self._L, lam)
        s, S = self._interp(self.s, self._S, lam)
        b, _ = self._interp(self.b, torch.zeros_like(self.b), lam)
        return l, s, b, L, S

    def _edges(self, lo: float, hi: float) -> torch.Tensor:
        """Ascending piece edges of [lo, hi]: split at grid nodes, no piece wider than ``self.piece``."""
        inner = self.lam[(self.lam > lo) & (self.lam < hi)]
        edges = torch.cat([torch.tensor([lo], dtype=torch.float64), inner, torch.tensor([hi], dtype=torch.float64)])
        pieces = torch.clamp(torch.ceil((edges[1:] - edges[:-1]) / self.piece), min=1).long()
        if bool((pieces > 1).any()):   # long pieces (sparse grid, outside it): split for accuracy
            edges = torch.cat([torch.cat([torch.linspace(float(edges[i]), float(edges[i + 1]), int(p) + 1,
                                                         dtype=torch.float64)[:-1]
                                          for i, p in enumerate(pieces)]), edges[-1:]])
        return edges

    def psi(self, lam_s: float, S_s: torch.Tensor, targets) -> torch.Tensor:
        """Psi(t) = int_{lam_s}^{t} e^{-(S_r - S_s)} b_r dr at each target t (M, *stat_shape).

        Integrated from lam_s relative to S_s (6-point Gauss-Legendre on smooth pieces), never as a
        difference of integrals from the grid start: with steep statistics S reaches hundreds over the
        grid and such differences lose every digit (then e^{S_s} multiplies the rounding error into
        inf / NaN)."""
        targets = torch.as_tensor(targets, dtype=torch.float64).flatten()
        view = (-1,) + (1,) * len(self.shape)
        out = torch.zeros((targets.numel(),) + self.shape, dtype=torch.float64)
        for j, t in enumerate(targets.tolist()):
            if t == lam_s:
                continue
            x, w = _rule(self._edges(min(lam_s, t), max(lam_s, t)))
            _, _, b, _, S = self.at(x)
            out[j] = (w.view(view) * torch.exp(S_s - S) * b).sum(0) * (1.0 if t > lam_s else -1.0)
        return out

    def nodes_with_psi(self, lam_s: float, lam_t: float, S_s: torch.Tensor):
        """Composite Gauss-Legendre nodes x and signed weights w for int_{lam_s}^{lam_t}, and Psi at x (see
        ``psi``); forward (lam_s < lam_t, every sampling step) vectorised: whole pieces summed, plus each
        node's part of its own piece."""
        edges = self._edges(min(lam_s, lam_t), max(lam_s, lam_t))
        k = _GL_X.numel()
        x, w = _rule(edges)
        if lam_t < lam_s:
            return x, -w, self.psi(lam_s, S_s, x)
        view = (-1,) + (1,) * len(self.shape)
        _, _, b, _, S = self.at(x)
        whole = (w.view(view) * torch.exp(S_s - S) * b).view((-1, k) + self.shape).sum(1)
        before = torch.cat([torch.zeros_like(whole[:1]), torch.cumsum(whole, 0)[:-1]])   # pieces left of each
        start = edges[:-1].repeat_interleave(k)
        sub = (start[:, None] + (x - start)[:, None] * (_GL_X[None] + 1) / 2).flatten()
        sw = ((x - start)[:, None] * _GL_W[None] / 2).flatten()
        _, _, bb, _, SS = self.at(sub)
        part = (sw.view(view) * torch.exp(S_s - SS) * bb).view((-1, k) + self.shape).sum(1)
        return x, w, before.repeat_interleave(k, 0) + part


def forward_process(x0: torch.Tensor, lam: float, kind: str, generator=None):
    """(x in sampler space, ComfyUI sigma, x_ve) of a forward-process sample at half-log-SNR lam."""
    sigma_ve = float(np.exp(-lam))
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                        device=generator.device if generator is not None else x0.device).to(x0.device)
    x_ve = x0 + sigma_ve * noise
    return ve_to_sampler(x_ve, sigma_ve, kind) + (x_ve,)


def ve_to_sampler(x_ve, sigma_ve: float, kind: str):
    """VE (x, sigma) to ComfyUI's sampler space for ``kind``."""
    if kind == "flow":
        sigma = sigma_ve / (1.0 + sigma_ve)
        return x_ve * (1.0 - sigma), sigma
    return x_ve, sigma_ve


def _denoise_ve(model, x_ve, lam, kind, extra_args):
    x, sigma = ve_to_sampler(x_ve, float(np.exp(-lam)), kind)
    s_in = x.new_ones([x.shape[0]])
    return model(x, sigma * s_in, **extra_args)


def smooth(table: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average along the lambda grid (window odd; edges use the available points)."""
    if window <= 1:
        return table
    half = window // 2
    out = torch.empty_like(table)
    for i in range(table.shape[0]):
        out[i] = table[max(0, i - half): i + half + 1].mean(0)
    return out


@torch.no_grad()
def estimate(model, x0_batches, lam_grid, kind="ve", extra_args=None, pool_dims=(), fd=1e-3, seed=0,
             progress=None, window=5, shrink=True) -> EMS:
    """Monte-Carlo EMS of ``model`` on ``lam_grid`` from clean samples (paper App. C.1.1).

    x0_batches: list of tensors (B, *shape) of clean samples (data, or the model's own samples).
    pool_dims: per-sample dims (e.g. (2, 3) for H, W of (B, C, H, W)) whose statistics are pooled.
    Costs 5 model evaluations per sample and grid point; ``progress(done, total)`` reports them.
    ``window``: moving average of l and of its derivative along the grid (the official script
    smooths l' the same way), since Monte-Carlo noise in l would otherwise roughen f and g.
    ``shrink``: multiply the regression slope s by its R^2 = Corr(f, f')^2 (per dimension), so a
    weak, noisy regression falls back towards s = 0, b = E[f'] instead of extrapolating noise.
    """
    extra_args = {} if extra_args is None else extra_args
    lam_grid = torch.as_tensor(lam_grid, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)     # on the CPU: the same statistics on every backend
    total, done = 2 * lam_grid.numel() * len(x0_batches), 0

    work = precise(x0_batches[0])      # the accumulation dtype, on the model's device

    def reduce(t):  # mean over the batch and the pooled dims, keepdim on pooled ones; tables live on the CPU
        dims = (0,) + tuple(pool_dims)
        return t.to(work).mean(dim=dims, keepdim=True).squeeze(0).cpu().double()

    l_rows = []
    for lam in lam_grid.tolist():  # pass 1: l = 1 - E[v (dD/dx) v]
        acc = 0.0
        for x0 in x0_batches:
            _, _, x_ve = forward_process(x0, lam, kind, gen)
            v = (torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1).to(x0.device, x0.dtype)
            step = fd * float(np.exp(-lam))
            jvp = (_denoise_ve(model, x_ve + step * v, lam, kind, extra_args)
                   - _denoise_ve(model, x_ve - step * v, lam, kind, extra_args)) / (2 * step)
            acc = acc + reduce(v * jvp)
            done += 1
            if progress:
                progress(done, total)
        l_rows.append(1.0 - acc / len(x0_batches))
    l_tab = smooth(torch.stack(l_rows), window)
    l_dot = smooth(torch.from_numpy(np.gradient(l_tab.numpy(), lam_grid.numpy(), axis=0)), window)

    s_rows, b_rows, over = [], [], []
    for i, lam in enumerate(lam_grid.tolist()):  # pass 2: moments of f and f'
        m = {"f": 0.0, "g": 0.0, "ff": 0.0, "fg": 0.0, "gg": 0.0}
        for x0 in x0_batches:
            _, _, x_ve = forward_process(x0, lam, kind, gen)
            d = _denoise_ve(model, x_ve, lam, kind, extra_args).to(work)
            x_ve = x_ve.to(work)
            move = (d - x_ve).to(x0.dtype)
            d1 = (_denoise_ve(model, x_ve.to(x0.dtype) + fd * move, lam + fd, kind, extra_args)
                  - _denoise_ve(model, x_ve.to(x0.dtype) - fd * move, lam - fd, kind, extra_args)).to(work) / (2 * fd)
            l_i, ld_i = l_tab[i].to(x_ve), l_dot[i].to(x_ve)
            f = (1 - l_i) * x_ve - d
            fp = -ld_i * x_ve + (1 - l_i) * (d - x_ve) - d1
            for key, val in (("f", f), ("g", fp), ("ff", f * f), ("fg", f * fp), ("gg", fp * fp)):
                m[key] = m[key] + reduce(val)
            done += 1
            if progress:
                progress(done, total)
        m = {k: v / len(x0_batches) for k, v in m.items()}
        var = (m["ff"] - m["f"] ** 2).clamp(min=1e-12)
        cov = m["fg"] - m["f"] * m["g"]
        s_i = cov / var
        if shrink:
            r2 = (cov ** 2 / (var * (m["gg"] - m["g"] ** 2).clamp(min=1e-12))).clamp(max=1.0)
            s_i = s_i * r2
        over.append((s_i > S_MAX) | (s_i < S_MIN))
        s_i = s_i.clamp(S_MIN, S_MAX)       # the intercept b below then belongs to the capped slope
        s_rows.append(s_i)
        b_rows.append(m["g"] - s_i * m["f"])
    ems = EMS(lam_grid, l_tab, smooth(torch.stack(s_rows), window), smooth(torch.stack(b_rows), window))
    ems.capped = float(torch.stack(over).double().mean())
    return ems


def lambda_range(sigma_max: float, sigma_min: float, kind: str) -> tuple[float, float]:
    """Half-log-SNR range of a model's sigma range (flow sigma 1 offset as ComfyUI does)."""
    hi = torch.tensor(min(sigma_max, 1.0 - 1e-4) if kind == "flow" else sigma_max, dtype=torch.float64)
    lo = torch.tensor(sigma_min, dtype=torch.float64)
    lam = [float(torch.log(a) - torch.log(s)) for a, s in (alpha_s(hi, kind), alpha_s(lo, kind))]
    return lam[0], lam[1]
