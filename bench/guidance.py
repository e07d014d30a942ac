"""Guidance benchmark on the analytic Gaussian-mixture kit: CFG vs Adaptive Guidance vs LinearAG vs hybrid.

    COMFYUI_PATH=/opt/comfy OMP_NUM_THREADS=1 python -m bench.guidance [--batch 512]

Everything is exact: the class-conditional mixture's denoisers (conditional and unconditional),
the log-density of samples under the conditional target and the class posterior. Each method
samples the same noise with the same sampler and steps; reported side by side, with ratios to
plain CFG: network evaluations spent (per sample), mean exact log-density log p(x | class) at
σ = 0.02, class accuracy (exact posterior), component coverage (Σ_k min(p̂_k, π_k|class): 1 when
samples occupy the class's mixture components in their true proportions), the share of samples
off the data manifold and the relative RMSE to CFG's samples. Part two: hybrid base→distilled inference with a mode-collapsed "distilled"
surrogate (the same mixture with 97% of each class's prior on its dominant component), 4 steps.
The analytic part needs no ComfyUI (the kit drives the pack's pure functions); with COMFYUI_PATH the
nodes also run on a tiny random SD1.5 model (evaluations, time, distance to CFG). Seconds on one CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "trainfree" not in sys.modules:
    _pkg = types.ModuleType("trainfree")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["trainfree"] = _pkg
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from kit.gmm import GaussianMixture, default_mixture  # noqa: E402
from kit.models import initial_state, noise_like  # noqa: E402
from kit.schedules import karras  # noqa: E402
from trainfree.guidance.adaptive_guidance import AdaptiveGuidance  # noqa: E402
from trainfree.guidance.hybrid_inference import sample_hybrid  # noqa: E402
from trainfree.guidance.linear_ag import Calibrator, LinearAG, estimated_steps  # noqa: E402
from trainfree.samplers import SAMPLERS  # noqa: E402

EVAL_SIGMA = 0.02
HISTORY = 2          # LinearAG regressors: 2 past steps (1 is exact for Gaussians; 2 fits the mixture)


def euler(model, x, sigmas, extra_args=None, **_):
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    return x


def dpmpp_2m(model, x, sigmas, extra_args=None, **_):
    return SAMPLERS["dpmpp_2m_hb"](model, x, sigmas, beta=1.0, kind="ve")


class Guided:
    """CFG on exact denoisers as a ComfyUI sampler sees it (model(x, sigma) -> D), with optional
    Adaptive Guidance (per row), LinearAG (per step) or a LinearAG calibrator; counts evaluations."""

    def __init__(self, gmm, cls, scale, sigmas, ag=None, linear=None, calibrator=None):
        self.gmm, self.cls, self.scale, self.sigmas = gmm, cls, scale, sigmas
        self.ag, self.linear, self.calibrator = ag, linear, calibrator
        self.nfe = 0
        self.seen = set()

    def _step(self, sigma):
        s = float(sigma.reshape(-1)[0])
        hits = ((self.sigmas[:-1] - s).abs() < 1e-9).nonzero().flatten()
        if not hits.numel() or int(hits[0]) in self.seen:
            return None
        self.seen.add(int(hits[0]))
        return int(hits[0])

    def __call__(self, x, sigma, **_):
        b = x.shape[0]
        sig = sigma.reshape(-1)[:1].to(torch.float64)
        step = self._step(sigma)
        d_c = self.gmm.denoise(x, sig, "ve", self.cls)
        self.nfe += b
        eps_c = (x - d_c) / sig
        if self.linear is not None and step is not None and self.linear.can_estimate(step, b):
            d_u = x - sig * self.linear.estimate(step, eps_c)
            self.linear.count(0, b)
        else:
            rows = torch.arange(b) if self.ag is None else self.ag.guided.nonzero().flatten()
            d_u = d_c.clone()
            if rows.numel():
                d_u[rows] = self.gmm.denoise(x[rows], sig, "ve")
            self.nfe += rows.numel()
            if self.linear is not None:
                self.linear.count(b, b)
        if self.linear is not None and step is not None:
            self.linear.record(step, eps_c, (x - d_u) / sig)
        if self.calibrator is not None and step is not None:
            self.calibrator.add(step, eps_c, (x - d_u) / sig)
        if self.ag is not None:
            self.ag.count(int(self.ag.guided.sum()), b)
            return self.ag.combine(x, d_c, d_u, self.scale)
        return d_u + self.scale * (d_c - d_u)


def classes(batch, gmm):
    return torch.arange(batch) % gmm.num_classes


def start(batch, sigmas, seed, dim=8):
    return initial_state(noise_like((batch, dim), seed=seed), sigmas[0], "ve")


def calibrate(gmm, scale, sigmas, history=1, batch=256, seed=100, sampler=dpmpp_2m):
    """LinearAG coefficients from plain-CFG trajectories (other seeds than the evaluation's)."""
    cal = Calibrator(len(sigmas) - 1, history)
    sampler(Guided(gmm, classes(batch, gmm), scale, sigmas, calibrator=cal), start(batch, sigmas, seed, gmm.dim),
            sigmas)
    return cal.solve()


def coverage(gmm, x, cls):
    """Mean over classes of Σ_k min(occupancy_k, π_k|class) (components assigned by exact likelihood)."""
    var = gmm.variances[None] + EVAL_SIGMA ** 2
    logn = -0.5 * (((x[:, None] - gmm.means[None]) ** 2) / var + var.log()).sum(-1)
    out = []
    for c in range(gmm.num_classes):
        mine = gmm.labels == c
        rows = cls == c
        if not rows.any():
            continue
        comp = logn[rows][:, mine].argmax(1)
        occ = torch.bincount(comp, minlength=int(mine.sum())).double() / rows.sum()
        prior = gmm.weights[mine] / gmm.weights[mine].sum()
        out.append(float(torch.minimum(occ, prior).sum()))
    return sum(out) / len(out)


def metrics(gmm, x, cls, nfe, ref=None, floor=None):
    s = torch.tensor(EVAL_SIGMA, dtype=torch.float64)
    logp = gmm.log_prob(x, s, "ve", cls)
    m = {"nfe": nfe / x.shape[0], "logp": float(logp.mean()),
         "off": float("nan") if floor is None else float((logp < floor).double().mean()),
         "acc": float((gmm.class_posterior(x, s).argmax(1) == cls).double().mean()), "cov": coverage(gmm, x, cls)}
    m["rmse"] = float("nan") if ref is None else float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    return m


def guidance_table(batch=512, steps=20, scale=5.0, threshold=1 - 1e-4, seed=9):
    gmm = default_mixture()
    cls, sig = classes(batch, gmm), karras(steps)
    x0 = start(batch, sig, seed, gmm.dim)
    coef, _ = calibrate(gmm, scale, sig, history=HISTORY)
    runs = {}
    m = Guided(gmm, cls, scale, sig)
    runs["CFG"] = (dpmpp_2m(m, x0, sig), m.nfe)
    m = Guided(gmm, cls, scale, sig, ag=AdaptiveGuidance(threshold, batch))
    runs[f"AG (1 - γ̄ = {1 - threshold:.0e})"] = (dpmpp_2m(m, x0, sig), m.nfe)
    m = Guided(gmm, cls, scale, sig, linear=LinearAG(coef, estimated_steps(steps, 0.0, 0.5, HISTORY), HISTORY))
    runs["LinearAG (first half)"] = (dpmpp_2m(m, x0, sig), m.nfe)
    m = Guided(gmm, cls, scale, sig, linear=LinearAG(coef, estimated_steps(steps, 0.0, 1.0, HISTORY), HISTORY))
    runs["LinearAG (all steps)"] = (dpmpp_2m(m, x0, sig), m.nfe)
    m = Guided(gmm, cls, scale, sig, ag=AdaptiveGuidance(threshold, batch),
               linear=LinearAG(coef, estimated_steps(steps, 0.0, 0.5, HISTORY), HISTORY))
    runs["LinearAG + AG"] = (dpmpp_2m(m, x0, sig), m.nfe)
    for fewer in (14, 13):                     # plain CFG at the NFE that AG / LinearAG + AG spend
        sig_f = karras(fewer)
        m = Guided(gmm, cls, scale, sig_f)
        runs[f"CFG, {fewer} steps"] = (dpmpp_2m(m, start(batch, sig_f, seed, gmm.dim), sig_f), m.nfe)
    ref, floor = runs["CFG"][0], exact_floor(gmm, cls)
    return {k: metrics(gmm, x, cls, n, ref, floor) for k, (x, n) in runs.items()}


def collapsed(gmm: GaussianMixture, delta: float = 0.03) -> GaussianMixture:
    """The 'distilled' surrogate: the same components, but the prior of each class puts 1 - delta on its
    dominant component (a mode-collapsed model that still follows a trajectory committed elsewhere)."""
    w = gmm.weights.clone()
    for c in range(gmm.num_classes):
        mine = (gmm.labels == c).nonzero().flatten()
        total = gmm.weights[mine].sum()
        w[mine] = total * delta / max(1, len(mine) - 1)
        w[mine[gmm.weights[mine].argmax()]] = total * (1 - delta)
    return GaussianMixture(gmm.means, gmm.variances, w, gmm.labels)


def turbo_sigmas(table, timesteps=(999, 749, 499, 249)):
    """A distilled model's few-step schedule (SDXL-Turbo-like timesteps) on an SD sigma table, then 0."""
    return torch.cat([table[list(timesteps)], torch.zeros(1, dtype=torch.float64)])


class Single:
    """One conditional model (cfg 1, as distilled models are sampled) or a CFG-guided base; counts evaluations."""

    def __init__(self, gmm, cls, scale=1.0):
        self.gmm, self.cls, self.scale, self.nfe = gmm, cls, scale, 0

    def __call__(self, x, sigma, **_):
        sig = sigma.reshape(-1)[:1].to(torch.float64)
        d_c = self.gmm.denoise(x, sig, "ve", self.cls)
        self.nfe += x.shape[0]
        if self.scale == 1.0:
            return d_c
        self.nfe += x.shape[0]
        d_u = self.gmm.denoise(x, sig, "ve")
        return d_u + self.scale * (d_c - d_u)


def hybrid_table(batch=1024, base_cfg=3.0, delta=0.03, seed=9, base_steps=(0, 1, 2), base_substeps=1):
    """Coverage and quality of distilled-only vs hybrid (base for the first k steps) vs base-only, 4 Euler
    steps on a Turbo-like schedule. Quality: the share of samples off the data manifold (log p(x|c) below
    the 1% quantile of exact samples' log p) and the mean log p."""
    from kit.schedules import sd_sigma_table

    gmm = default_mixture()
    distilled_gmm = collapsed(gmm, delta)
    cls, sig = classes(batch, gmm), turbo_sigmas(sd_sigma_table())
    steps = len(sig) - 1
    x0 = start(batch, sig, seed, gmm.dim)
    floor = exact_floor(gmm, cls)
    out = {}
    for k in base_steps:
        base, dist = Single(gmm, cls, base_cfg), Single(distilled_gmm, cls)
        x = sample_hybrid(euler, base, dist, x0, sig, base_steps=k, base_substeps=base_substeps)
        label = "distilled only" if k == 0 else f"hybrid, {k} base step{'s' if k > 1 else ''}"
        out[label] = metrics(gmm, x, cls, base.nfe + dist.nfe, floor=floor)
    if base_substeps == 1 and 1 in base_steps:      # the paper's script: 4 base steps down to the distilled σ_1
        base, dist = Single(gmm, cls, base_cfg), Single(distilled_gmm, cls)
        x = sample_hybrid(euler, base, dist, x0, sig, base_steps=1, base_substeps=4)
        out["hybrid, 1 base step in 4 substeps"] = metrics(gmm, x, cls, base.nfe + dist.nfe, floor=floor)
    base = Single(gmm, cls, base_cfg)
    out[f"base only (CFG {base_cfg:g})"] = metrics(gmm, sample_hybrid(euler, base, base, x0, sig, base_steps=steps),
                                                   cls, base.nfe, floor=floor)
    return out


def exact_floor(gmm, cls, seed=1):
    """1% quantile of log p(x | c) over exact samples of the target (noised to EVAL_SIGMA)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.cat([gmm.sample(1, cls=int(c), generator=g) for c in cls])
    xs = xs + EVAL_SIGMA * torch.randn(xs.shape, dtype=xs.dtype, generator=g)
    return float(torch.quantile(gmm.log_prob(xs, torch.tensor(EVAL_SIGMA, dtype=torch.float64), "ve", cls), 0.01))


def _table(rows, ref_key, cols):
    ref = rows[ref_key]
    head = "| method | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, m in rows.items():
        cells = []
        for c, fmt in cols:
            key = {"NFE / sample": "nfe", "NFE ratio": "nfe", "log p(x|c)": "logp", "Δ log p": "logp",
                   "class acc.": "acc", "coverage": "cov", "coverage ratio": "cov", "rel. RMSE to CFG": "rmse",
                   "off-manifold": "off"}[c]
            v = m[key]
            if c in ("NFE ratio", "coverage ratio"):
                v = v / ref[key]
            elif c == "Δ log p":
                v = v - ref[key]
            cells.append(fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tiny_table(comfy_path, arch="sd15", steps=20, cfg=5.0, batch=4):
    """The nodes on a tiny random ComfyUI model: network evaluations (rows through the diffusion model),
    wall time and relative RMSE of the final latent to plain CFG, same noise and prompts."""
    import time

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from harness import Comfy

    c = Comfy(comfy_path)
    import comfy.patcher_extension as pe
    import comfy.sample

    tiny = c.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    node = lambda n: c.nodes.NODE_CLASS_MAPPINGS[n]()            # noqa: E731
    base = tiny.build(arch)
    pos, neg = tiny.conditioning(arch, 1, batch), tiny.conditioning(arch, 2, batch)
    shape = (batch, 4, 8, 8) if arch in ("sd15", "sdxl") else (batch, 16, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rec = node("TrainFreeLinearAGCalibrate").calibrate(base, pos, neg, {"samples": torch.zeros(8, *shape[1:])},
                                                        steps, cfg, "euler", "normal", 2, 1, "bench_tiny", True)[0]

    def run(model):
        rows = []

        def count(executor, x, *a, **k):
            rows.append(x.shape[0])
            return executor(x, *a, **k)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench_rows", count)
        t = time.perf_counter()
        out = comfy.sample.sample(m, noise, steps, cfg, "euler", "normal", pos, neg, torch.zeros(shape), seed=0,
                                  disable_pbar=True)
        return out, sum(rows) / batch, time.perf_counter() - t

    lin = node("TrainFreeLinearAG").patch(base, rec, 0.0, 0.5)[0]
    models = {"CFG": base, "AG (0.9999)": node("TrainFreeAdaptiveGuidance").patch(base, 0.9999)[0],
              "AG (0.999)": node("TrainFreeAdaptiveGuidance").patch(base, 0.999)[0],
              "LinearAG (first half)": lin,
              "LinearAG + AG (0.999)": node("TrainFreeAdaptiveGuidance").patch(lin, 0.999)[0]}
    run(base)                                                        # warm-up
    out = {k: run(m) for k, m in models.items()}
    ref = out["CFG"][0]
    return {k: {"nfe": n, "time": t, "rmse": float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())}
            for k, (x, n, t) in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = guidance_table(args.batch)
    print(f"## Guidance (DPM++2M, CFG 5, {args.batch} samples, 3 classes x 2 components; 20 steps unless said; "
          "'CFG, 14/13 steps' spend what AG / LinearAG + AG spend)\n")
    print(_table(g, "CFG", [("NFE / sample", "{:.2f}"), ("NFE ratio", "{:.3f}"), ("log p(x|c)", "{:.3f}"),
                            ("Δ log p", "{:+.3f}"), ("class acc.", "{:.3f}"), ("coverage", "{:.3f}"),
                            ("off-manifold", "{:.3f}"), ("rel. RMSE to CFG", "{:.4f}")]))
    h = hybrid_table(2 * args.batch)
    print(f"\n## Hybrid base→distilled (4 x Euler, Turbo timesteps 999/749/499/249; distilled = 97% of each class's "
          f"prior on its dominant component; {2 * args.batch} samples)\n")
    print(_table(h, "distilled only", [("NFE / sample", "{:.2f}"), ("coverage", "{:.3f}"), ("coverage ratio", "{:.2f}"),
                                       ("off-manifold", "{:.3f}"), ("log p(x|c)", "{:.3f}"), ("class acc.", "{:.3f}")]))
    path = os.environ.get("COMFYUI_PATH")
    if path:
        t = tiny_table(path)
        ref = t["CFG"]
        print("\n## The nodes on a tiny random SD1.5 model (ComfyUI, KSampler euler, 20 steps, CFG 5, batch 4)\n")
        print("| patch | NFE / sample | NFE ratio | time ratio | rel. RMSE to CFG |\n|---|---|---|---|---|")
        for k, m in t.items():
            print(f"| {k} | {m['nfe']:.1f} | {m['nfe'] / ref['nfe']:.3f} | {m['time'] / ref['time']:.2f} | "
                  f"{m['rmse']:.4f} |")


if __name__ == "__main__":
    main()
