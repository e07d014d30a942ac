"""How low can a few-step solver go on the analytic kit? What a fitted one reaches, next to issue 3's 0.5x target.

    COMFYUI_PATH=/path/to/ComfyUI python -m bench.solver_bound [--cells ve:7.5:5,flow:7.5:5] [--train 2048] [--order 2]

Not a pack feature: an experiment that tells whether the target is out of reach of any few-step
solver here or only of the calibrated solvers the pack ships. The solver is the most general
n-evaluation exponential integrator in data prediction, with ComfyUI's noising x = a x0 + s n
(VE: a = 1, s = sigma; flow: a = 1 - t, s = t):

    x_{i+1} = (s_{i+1}/s_i) x_i + (a_{i+1} - a_i s_{i+1}/s_i) sum_{j<=i} w_ij D(x_j, sigma_j)

DDIM / Euler is w_ii = 1; DPM-Solver++, UniPC, DPM-Solver-v3's multistep and DC-Solver's
compensation are particular w. Here all n(n+1)/2 weights and the n - 1 interior sigmas (in log-SNR)
are fitted *jointly, end to end* by Adam on ``--train`` noises against exact ODE solutions
(as "bespoke" or "S4S"-type learned solvers do; DC-Solver fits its ratios one step at a time and
the Schedule Search node moves only the sigmas, derivative-free). The iterate kept is the one with
the lowest error on 1024 validation noises; the error is then measured on the benchmark's 8192
held-out noises (``--heldout``), next to ComfyUI's built-ins on the same noises and schedule (Karras / linear t).

``--order K`` fits only the sigmas, the weights being the exponential Adams-Bashforth rule of order K on them
(``adams_weights``; 1: DDIM): does a higher-order fixed rule on ideal sigmas get there?
``--dc-joint`` instead searches what the pack's own methods can move, DC-Solver's compensation ratios and
the interior sigmas, jointly and end to end but without gradients (coordinate pattern search, 600 runs,
``fit_dc``): what a calibration node could get from them together.
"""
from __future__ import annotations

import argparse
import math

import torch

from .common import setup


def _coefs(sigma, kind):
    from kit.gmm import coefficients

    return coefficients(sigma, kind)


def _lam(sigma, kind):
    a, s = _coefs(sigma, kind)
    return torch.log(a) - torch.log(s)


def _sigma(lam, kind):
    return torch.exp(-lam) if kind == "ve" else torch.sigmoid(-lam)


_GAUSS = None          # 16-point Gauss-Legendre nodes and weights on [-1, 1], made once


def adams_weights(lam, i, order):
    """Weights w_ij of the exponential Adams-Bashforth rule of ``order`` for the step lam[i] -> lam[i+1]: the
    Lagrange polynomial in lambda through the last ``order`` denoised outputs, integrated exactly against
    e^(lam - lam[i+1]) (16-point Gauss-Legendre) and divided by that weight's integral 1 - e^-h, so they sum to 1.
    Order 1 is DDIM; a point at lambda = -inf (flow's start) is left out of the stencil."""
    global _GAUSS
    w = torch.zeros(i + 1, dtype=torch.float64)
    stencil = [j for j in range(i, max(-1, i - order), -1) if math.isfinite(float(lam[j].detach()))] or [i]
    if len(stencil) == 1:                                   # DDIM (flow's first step: h is infinite)
        w[i] = 1.0
        return w
    if _GAUSS is None:
        import numpy as np

        _GAUSS = tuple(torch.tensor(t, dtype=torch.float64) for t in np.polynomial.legendre.leggauss(16))
    u, v = _GAUSS
    h = lam[i + 1] - lam[i]
    nodes = lam[i] + h * (u + 1) / 2
    kernel = torch.exp(nodes - lam[i + 1]) * v * h / 2
    for j in stencil:
        basis = torch.ones_like(nodes)
        for m in stencil:
            if m != j:
                basis = basis * (nodes - lam[m]) / (lam[j] - lam[m])
        w[j] = (kernel * basis).sum()
    return w / -torch.expm1(-h)


class LearnedIntegrator(torch.nn.Module):
    """The general n-step exponential integrator above, initialised as DDIM on ``sigmas`` (n steps, ending at 0);
    with ``order`` its weights are not free but the exponential Adams rule of that order on its (fitted) sigmas."""

    def __init__(self, sigmas, kind, order=None):
        super().__init__()
        self.kind, self.n, self.sigma0, self.order = kind, len(sigmas) - 1, sigmas[:1].double(), order
        lam = _lam(sigmas[1:-1].double(), kind)
        self.lam1 = torch.nn.Parameter(lam[:1].clone())
        self.gaps = torch.nn.Parameter(torch.log(torch.expm1(lam[1:] - lam[:-1])))   # softplus^-1: order kept
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.eye(i + 1, dtype=torch.float64)[i])
                                        for i in range(self.n))

    def sigmas(self):
        lam = torch.cat([self.lam1, self.lam1 + torch.cumsum(torch.nn.functional.softplus(self.gaps), 0)])
        return torch.cat([self.sigma0, _sigma(lam, self.kind), torch.zeros(1, dtype=torch.float64)])

    def forward(self, denoise, x):
        sig, outs = self.sigmas(), []
        lam = _lam(sig.clamp(max=1.0) if self.kind == "flow" else sig, self.kind)
        for i in range(self.n):
            outs.append(denoise(x, sig[i]))
            w = self.w[i] if self.order is None or i == self.n - 1 else adams_weights(lam, i, self.order)
            d = sum(w[j] * outs[j] for j in range(i + 1))
            a0, s0 = _coefs(sig[i], self.kind)
            a1, s1 = _coefs(sig[i + 1], self.kind)
            x = (s1 / s0) * x + (a1 - a0 * s1 / s0) * d
        return x


def _problem(kind, cfg, n, seed, sig0):
    from kit import reference
    from kit.gmm import default_mixture
    from kit.models import AnalyticModel, initial_state, noise_like

    model = AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow", cls=torch.arange(n) % 3, cfg=cfg)
    x = initial_state(noise_like((n, 8), seed=seed), sig0, kind)
    return model, x, reference.solve(model.exact, x, sig0, 0.0)


def fit(kind, cfg, steps, train=2048, iters=300, lr=0.02, heldout=8192, schedule_only=False, validation=1024,
        order=None, log=print):
    """(fitted integrator, its relative RMSE on the held-out noises, the held-out problem)."""
    from .__main__ import _schedule

    sched = _schedule(kind, steps)
    sig0 = float(sched[0])
    tr, va, te = (_problem(kind, cfg, n, seed, sig0) for n, seed in ((train, 7), (validation, 8), (heldout, 42)))
    scale = float(te[2].pow(2).mean().sqrt())
    solver = LearnedIntegrator(sched, kind, order)
    opt = torch.optim.Adam([solver.lam1, solver.gaps] if schedule_only or order else solver.parameters(), lr=lr)

    def rel(problem):
        with torch.no_grad():
            return float((solver(problem[0].exact, problem[1]) - problem[2]).pow(2).mean().sqrt()) / scale

    best = (rel(va), {k: v.clone() for k, v in solver.state_dict().items()})
    log(f"  {kind} CFG {cfg} NFE {steps}: {'DDIM' if order is None else f'order-{order} Adams'} start "
        f"{rel(te):.3e} on the held-out noises")
    for it in range(iters):
        opt.zero_grad()
        loss = (solver(tr[0].exact, tr[1]) - tr[2]).pow(2).mean()
        loss.backward()
        opt.step()
        if it % 20 == 19:
            v = rel(va)
            if v < best[0]:
                best = (v, {k: t.clone() for k, t in solver.state_dict().items()})
    solver.load_state_dict(best[1])
    return solver, rel(te), te


def fit_dc(kind, cfg, steps, train=1024, budget=600, heldout=8192, bounds=(0.0, 2.0), log=print):
    """DC-Solver's compensation ratios and the n - 1 interior sigmas searched *jointly, end to end*, without
    gradients (the most a calibration node could do with the issue's methods): coordinate pattern search on
    ``train`` noises against exact ODE solutions, ``budget`` runs, ratios in ``bounds`` (the node searches each
    ratio alone in [0.5, 1.5]). Returns (sigmas, ratios, relative RMSE on the held-out noises, held-out problem)."""
    from trainfree.samplers.dc_solver import sample_dc_solver

    from .__main__ import _schedule

    sched = _schedule(kind, steps).double()
    sig0 = float(sched[0])
    (model, x, ref), te = (_problem(kind, cfg, n, seed, sig0) for n, seed in ((train, 7), (heldout, 42)))
    lam_cap = float(_lam(torch.tensor([0.0292 if kind == "ve" else 1e-3], dtype=torch.float64), kind))  # as bench
    n_lam = steps - 1               # ratios act from the third step to the one before the last (which returns D)

    def ratios(p):
        return [1.0, 1.0][:steps] + p[n_lam:].tolist() + [1.0] * (steps > 2)

    def run(p, problem):
        sig = torch.cat([sched[:1], _sigma(p[:n_lam], kind), sched[-1:]])
        return sample_dc_solver(problem[0].exact, problem[1].clone(), sig, ratios=ratios(p), kind=kind)

    def loss(p):
        lam, r = p[:n_lam], p[n_lam:]
        if (lam[1:] <= lam[:-1] + 0.05).any() or float(lam[-1]) > lam_cap + 1e-9 or (r < bounds[0]).any() \
                or (r > bounds[1]).any():
            return math.inf
        v = float((run(p, (model, x)) - ref).pow(2).mean())
        return v if math.isfinite(v) else math.inf

    n_r = max(0, steps - 3)
    p = torch.cat([_lam(sched[1:-1], kind), torch.ones(n_r, dtype=torch.float64)])
    best, spent = loss(p), 1
    start = best
    step = torch.cat([torch.full((n_lam,), 0.3, dtype=torch.float64), torch.full((n_r,), 0.2, dtype=torch.float64)])
    while spent < budget and float(step.max()) > 1e-3:
        improved = False
        for c in range(p.numel()):
            for sign in (1.0, -1.0):
                moved = False
                while spent < budget:           # keep going the way that helps
                    q = p.clone()
                    q[c] += sign * step[c]
                    v, spent = loss(q), spent + 1
                    if not v < best:
                        break
                    best, p, moved = v, q, True
                if moved:
                    improved = True
                    break
        if not improved:
            step = step / 2
    scale = float(te[2].pow(2).mean().sqrt())
    err = float((run(p, te) - te[2]).pow(2).mean().sqrt()) / scale
    log(f"  {kind} CFG {cfg} NFE {steps}: {spent} runs, training RMSE {math.sqrt(start):.4e} -> {math.sqrt(best):.4e}, "
        f"ratios {[round(r, 2) for r in ratios(p)]}")
    return torch.cat([sched[:1], _sigma(p[:n_lam], kind), sched[-1:]]), ratios(p), err, te


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="ve:1:5,ve:3:5,ve:7.5:5,flow:1:5,flow:3:5,flow:7.5:5",
                        help="kind:cfg:NFE, comma-separated")
    parser.add_argument("--train", type=int, default=None, help="training noises (default 2048; --dc-joint: 1024)")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--schedule-only", action="store_true",
                        help="fit only the sigmas (DDIM weights kept): Euler/DDIM on a gradient-fitted schedule")
    parser.add_argument("--order", type=int, default=None,
                        help="fit only the sigmas of the exponential Adams-Bashforth rule of this order (1: DDIM)")
    parser.add_argument("--dc-joint", action="store_true",
                        help="search DC-Solver's ratios and the sigmas jointly, end to end, without gradients")
    parser.add_argument("--heldout", type=int, default=8192, help="noises the error is measured on (seed 42)")
    args = parser.parse_args()
    has_comfy = setup(require_comfy=False)
    from .__main__ import ComfyShaped, _run, _schedule, _setup_imports

    builtins, ms_classes = _setup_imports() if has_comfy else ({}, None)
    rows = []
    for cell in args.cells.split(","):
        kind, cfg, steps = cell.split(":")
        cfg, steps = float(cfg), int(steps)
        if args.dc_joint:
            sigmas, _, err, (model, x, ref) = fit_dc(kind, cfg, steps, args.train or 1024, heldout=args.heldout)
        else:
            solver, err, (model, x, ref) = fit(kind, cfg, steps, args.train or 2048, args.iters, heldout=args.heldout,
                                                 schedule_only=args.schedule_only, order=args.order)
            sigmas = solver.sigmas().detach()
        scale = float(ref.pow(2).mean().sqrt())
        best_name, best = None, math.inf
        if builtins:
            model.model_sampling = ms_classes[kind]()
            shaped = ComfyShaped(model, model.model_sampling)
            for name, fn in builtins.items():
                for k in range(1, steps + 1):              # as python -m bench: by NFE (Heun: 2k - 1)
                    try:
                        out, nfe = _run(fn, shaped, x, _schedule(kind, k), {})
                    except Exception:
                        continue
                    e = float((out.double() - ref).pow(2).mean().sqrt()) / scale
                    if round(nfe) == steps and e < best:
                        best_name, best = name, e
        sig = ", ".join(f"{float(s):.3g}" for s in sigmas[:-1])
        rows.append((cell, err, best_name, best, sig))
        print(f"  fitted: {err:.3e}, best built-in {best_name} {best:.3e}; sigmas {sig}", flush=True)
    what = ("DC-Solver, ratios and sigmas searched jointly" if args.dc_joint else
            f"order-{args.order} exponential Adams on fitted sigmas" if args.order else
            "Euler/DDIM on fitted sigmas" if args.schedule_only else "jointly fitted integrator")
    print(f"\n| cell (kind:CFG:NFE) | {what} | best built-in | ratio |\n|---|---|---|---|")
    for cell, err, name, best, _ in rows:
        ratio = f"{err / best:.2f}" if math.isfinite(best) else "—"
        print(f"| {cell} | {err:.3e} | {name or '—'} {best:.3e} | {ratio} |")


if __name__ == "__main__":
    main()
