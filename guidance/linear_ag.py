"""LinearAG: replace early unconditional evaluations by a fitted linear combination of past estimates.

Paper: Castillo, Kohler, Pérez, Pérez, Pumarola, Ghanem, Arbeláez, Thabet, "Adaptive Guidance:
Training-free Acceleration of Conditional Diffusion Models" (AAAI 2025, arXiv 2312.12487), §5
("LinearAG"). Observation: in the first half of sampling the unconditional noise estimate is well
predicted by an affine map of the estimates the sampler already has, so every other unconditional
network evaluation there can be replaced by

    ε̂_u,i  ≈  β_i,0 · ε_c,i  +  Σ_{j=1..H} ( β_i,2j−1 · ε_c,i−j  +  β_i,2j · ε_u,i−j )          (1)

with ε = (x − D)/σ at each step's own x (ComfyUI sigma form; for rectified flow this is the
velocity), scalar coefficients per step i, fitted once per model by ordinary least squares over
calibration trajectories sampled with plain CFG (all entries of all samples are observations).

Why (1) and not a direct map of x: for Gaussian data, ε_u,i = k_u(σ_i) x_i and
ε_c,i = k_c(σ_i)(x_i − μ) with an unknown, prompt-dependent μ; one past pair (ε_c,i−1, ε_u,i−1)
determines μ, so (1) with H = 1 is *exact* there (tests recover the closed-form β). H = 1 is the
default.

Which steps: steps i with start ≤ i/N < end (paper: the first half) and i odd (every other step,
so the history step i−1 always holds a real evaluation); step 0 is always evaluated.

Departures / unverified against the paper (its text was not available while writing this): the
paper fits per-step coefficients by OLS on ~200 trajectories; the exact regressor set of the paper
is reproduced here as "current conditional + H past (conditional, unconditional) pairs"; a
per-pixel intercept is not used (it would not transfer between prompts). Coefficients are scalars
shared by all entries of a sample, so one calibration serves every resolution.
"""
from __future__ import annotations

import torch

from ..samplers.common import precise


def num_features(history: int) -> int:
    return 1 + 2 * int(history)


def estimated_steps(steps: int, start_percent: float = 0.0, end_percent: float = 0.5, history: int = 1) -> list:
    """Step indices whose unconditional evaluation is replaced (odd steps, in [start, end) of the run)."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}")
    return [i for i in range(max(1, history), steps) if i % 2 == 1 and start_percent <= i / steps < end_percent]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).to(precise(t))      # float64, except on MPS (none there)


def _features(eps_c, past) -> torch.Tensor:
    """(B, n, P) regressors: ε_c,i then (ε_c,i−j, ε_u,i−j) for j = 1..H."""
    cols = [_flat(eps_c)]
    for c, u in past:
        cols += [_flat(c), _flat(u)]
    return torch.stack(cols, dim=-1)


class Calibrator:
    """Accumulates the normal equations of (1) per step over calibration trajectories (memory: P² per step)."""

    def __init__(self, steps: int, history: int = 1):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.steps, self.history = int(steps), int(history)
        p = num_features(history)
        self.xtx = torch.zeros(self.steps, p, p, dtype=torch.float64)
        self.xty = torch.zeros(self.steps, p, dtype=torch.float64)
        self.yty = torch.zeros(self.steps, dtype=torch.float64)
        self.count = torch.zeros(self.steps, dtype=torch.long)
        self._past: dict = {}

    def start_run(self) -> None:
        self._past = {}

    def add(self, step: int, eps_c: torch.Tensor, eps_u: torch.Tensor) -> None:
        """Real conditional and unconditional estimates at ``step`` of the current trajectory batch."""
        eps_c, eps_u = eps_c.detach(), eps_u.detach()
        past = [self._past.get(step - j) for j in range(1, self.history + 1)]
        if all(p is not None for p in past):
            a = _features(eps_c, past).reshape(-1, self.xtx.shape[-1]).to("cpu", torch.float64)
            y = _flat(eps_u).reshape(-1).to("cpu", torch.float64)
            self.xtx[step] += a.T @ a
            self.xty[step] += a.T @ y
            self.yty[step] += y @ y
            self.count[step] += y.numel()
        self._past[step] = (eps_c.detach().clone(), eps_u.detach().clone())
        for k in [k for k in self._past if k <= step - self.history]:
            del self._past[k]

    def solve(self):
        """(coefficients (steps, P), R² (steps,)): NaN rows for steps without data (step < history)."""
        p = self.xtx.shape[-1]
        coef = torch.full((self.steps, p), float("nan"), dtype=torch.float64)
        r2 = torch.full((self.steps,), float("nan"), dtype=torch.float64)
        for i in range(self.steps):
            if not self.count[i]:
                continue
            a, b = self.xtx[i], self.xty[i]
            ridge = 1e-12 * float(a.diagonal().mean())
            beta = torch.linalg.solve(a + ridge * torch.eye(p, dtype=a.dtype), b)
            coef[i] = beta
            rss = self.yty[i] - 2 * beta @ b + beta @ a @ beta
            r2[i] = 1.0 - rss / self.yty[i].clamp_min(1e-300)
        return coef, r2


class LinearAG:
    """Sampling-time state: records the estimates of each step, predicts ε_u where scheduled."""

    def __init__(self, coef: torch.Tensor, steps_to_estimate, history: int = 1):
        coef = torch.as_tensor(coef, dtype=torch.float64)
        if coef.ndim != 2 or coef.shape[1] != num_features(history):
            raise ValueError(f"coefficients of shape {tuple(coef.shape)} do not fit history {history}")
        self.coef, self.history = coef, int(history)
        self.todo = {int(i) for i in steps_to_estimate if 0 <= int(i) < coef.shape[0] and bool(coef[int(i)].isfinite().all())}
        self._past: dict = {}
        self.saved = 0      # unconditional evaluations replaced (per batch row)
        self.total = 0      # unconditional evaluations plain CFG would have made

    def can_estimate(self, step: int, batch: int) -> bool:
        if step not in self.todo:
            return False
        past = [self._past.get(step - j) for j in range(1, self.history + 1)]
        return all(p is not None and p[0].shape[0] == batch for p in past)

    @torch.no_grad()
    def estimate(self, step: int, eps_c: torch.Tensor) -> torch.Tensor:
        past = [self._past[step - j] for j in range(1, self.history + 1)]
        a = _features(eps_c, past)
        out = a @ self.coef[step].to(a.device, a.dtype)
        return out.reshape(eps_c.shape).to(eps_c.dtype)

    def record(self, step: int, eps_c: torch.Tensor, eps_u: torch.Tensor) -> None:
        self._past[step] = (eps_c.detach(), eps_u.detach())
        for k in [k for k in self._past if k <= step - self.history]:
            del self._past[k]

    def count(self, evaluated: int, batch: int) -> None:
        self.total += batch
        self.saved += batch - evaluated
