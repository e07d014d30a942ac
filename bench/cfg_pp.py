"""CFG++ versus CFG at equal model evaluations, on the exact class-conditional Gaussian mixture.

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 python -m bench.cfg_pp [--batch 512]

Side by side in one run, for eps (VE, Karras schedule) and rectified-flow (CONST, linear schedule)
models: each solver with plain CFG at scale w against its CFG++ variant at lam, matched as the paper
matches them (lam in [0, 1] plays the role of w in [1, 12.5]: w = 1 + 11.5 lam), at 5, 10 and 20
steps (2 evaluations per step and sample for both). With COMFYUI_PATH, ComfyUI's own euler /
dpmpp_2m and their *_cfg_pp samplers run on the same model (through its post-CFG hook).

Metrics on the final samples, all exact: mean log-density under the prompted class's distribution
log p(x | c), class accuracy (argmax of the exact class posterior), component coverage (1 - total
variation between the frequencies of the class's mixture components among the samples and their
weights; 1 = every mode at its share), evaluations spent per sample. Ratios CFG++ / CFG, and the
difference for the log-density. Reference row: exact samples of p(x | c).
"""
from __future__ import annotations

import argparse
import math
import types
from pathlib import Path

import torch

from .common import setup

ROOT = Path(__file__).resolve().parents[1]
STEPS = (5, 10, 20)
LAMBDAS = (0.2, 0.5, 0.8)
OURS = {  # label -> (CFG++ name, base registry name, base options equal to the CFG++ variant's defaults)
    "dpm++2m": ("dpmpp_2m", "dpmpp_2m_hb", {"beta": 1.0}),
    "uni_pc_bh2": ("uni_pc", "dc_solver", {}),
    "plms4 (ipndm)": ("plms", "plms", {}),
    "ghvb 3.5": ("ghvb", "ghvb", {"order": 3.5}),
    "dpm-solver-v3 (no EMS)": ("dpm_solver_v3", "dpm_solver_v3", {}),
}
CORE = {"core euler": ("euler_cfg_pp", "euler"), "core dpm++2m": ("dpmpp_2m_cfg_pp", "dpmpp_2m")}


def _imports():
    if not setup(require_comfy=False):
        return None, None
    import comfy.k_diffusion.sampling as kds
    import comfy.model_sampling as cms

    class VE(cms.ModelSamplingDiscrete, cms.EPS):
        pass

    class Flow(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    return kds, {"ve": VE, "flow": Flow}


class Mixture:
    """CFG on the exact mixture as ComfyUI's model wrapper: runs the post-CFG functions of
    ``model_options`` (ComfyUI's *_cfg_pp samplers read D_u there), keeps D_u for ``uncond()``,
    counts evaluations per sample (cond + uncond)."""

    def __init__(self, gmm, kind, cls, scale, model_sampling):
        self.gmm, self.kind, self.cls, self.scale = gmm, kind, cls, scale
        self.model_sampling = model_sampling
        ns = types.SimpleNamespace
        self.inner_model = ns(inner_model=ns(model_sampling=model_sampling), model_sampling=model_sampling,
                              model_patcher=ns(get_model_object=lambda name: model_sampling))
        self.nfe, self.last = 0, None

    def __call__(self, x, sigma, model_options=None, **_):
        x64, sigma = x.to(torch.float64), sigma.to(torch.float64)
        d_c = self.gmm.denoise(x64, sigma, self.kind, self.cls)
        d_u = self.gmm.denoise(x64, sigma, self.kind)
        self.nfe += 2 * x.shape[0]
        out = d_u + self.scale * (d_c - d_u)
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "uncond_denoised": d_u, "cond_denoised": d_c, "uncond": [], "cond": [],
                      "cond_scale": self.scale, "sigma": sigma, "input": x64, "model_options": model_options})
        self.last = d_u.to(x.dtype)
        return out.to(x.dtype)

    def uncond(self):
        return self.last


def metrics(gmm, x, cls):
    x = x.to(torch.float64)
    zero = torch.zeros(x.shape[0], dtype=torch.float64)
    logp = float(gmm.log_prob(x, zero, "ve", cls).mean())
    acc = float((gmm.class_posterior(x, zero).argmax(1) == cls).double().mean())
    flat = x.reshape(x.shape[0], -1)
    logn, _ = gmm._component_terms(flat, torch.ones_like(zero), zero)
    comp = (gmm._log_prior(cls, x.shape[0]) + logn).argmax(1)
    covs = []
    for c in range(gmm.num_classes):
        members = (gmm.labels == c).nonzero().flatten()
        rows = comp[cls == c]
        w = gmm.weights[members] / gmm.weights[members].sum()
        freq = torch.stack([(rows == k).double().mean() for k in members])
        covs.append(1.0 - 0.5 * float((freq - w).abs().sum()))
    return logp, acc, sum(covs) / len(covs)


def _schedule(kind, n):
    from kit.schedules import flow_linear, karras

    return karras(n) if kind == "ve" else flow_linear(n)


def table(kind, batch, kds, ms_classes):
    from kit.gmm import default_mixture
    from kit.models import CONST, EPS, initial_state, noise_like
    from trainfree.samplers import SAMPLERS
    from trainfree.samplers.cfg_pp import CFG_PP_SAMPLERS

    gmm = default_mixture()
    cls = torch.arange(batch) % 3
    ms = ms_classes[kind]() if ms_classes else (EPS() if kind == "ve" else CONST())
    runs = {label: (CFG_PP_SAMPLERS[pp], SAMPLERS[base], opts) for label, (pp, base, opts) in OURS.items()}
    if kds is not None:
        runs.update({label: (getattr(kds, "sample_" + pp), getattr(kds, "sample_" + base), {})
                     for label, (pp, base) in CORE.items()})
    rows = []
    for steps in STEPS:
        sig = _schedule(kind, steps)
        x0 = initial_state(noise_like((batch, 8), seed=1), sig[0], kind).to(torch.float32)
        for label, (pp, base, opts) in runs.items():
            for lam in LAMBDAS:
                w = 1.0 + 11.5 * lam
                m_pp, m_cfg = Mixture(gmm, kind, cls, lam, ms), Mixture(gmm, kind, cls, w, ms)
                extra = {"model_options": {}}
                if label.startswith("core"):
                    out_pp = pp(m_pp, x0.clone(), sig.to(torch.float32), extra_args=dict(extra), disable=True)
                else:
                    out_pp = pp(m_pp, x0.clone(), sig.to(torch.float32), extra_args=dict(extra), uncond=m_pp.uncond)
                out_cfg = base(m_cfg, x0.clone(), sig.to(torch.float32), extra_args=dict(extra), disable=True, **opts)
                rows.append((label, steps, lam, w, m_pp.nfe / batch, m_cfg.nfe / batch,
                             metrics(gmm, out_pp, cls), metrics(gmm, out_cfg, cls)))
    exact = metrics(gmm, gmm.sample(batch, cls, torch.Generator().manual_seed(0)), cls)
    return rows, exact


def render(kind, rows, exact):
    out = [f"\n### {'eps (VE, Karras)' if kind == 've' else 'rectified flow (CONST, linear)'}\n",
           f"Exact samples of p(x|c): log p {exact[0]:.2f}, accuracy {exact[1]:.3f}, coverage {exact[2]:.3f}\n",
           "| solver | steps | lam / w | NFE CFG++ / CFG | log p CFG++ | log p CFG | diff | acc CFG++ | acc CFG "
           "| ratio | coverage CFG++ | coverage CFG | ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, steps, lam, w, n_pp, n_cfg, (lp, ap, cp), (lc, ac, cc) in rows:
        out.append(f"| {label} | {steps} | {lam:g} / {w:g} | {n_pp:g} / {n_cfg:g} | {lp:.2f} | {lc:.2f} | "
                   f"{lp - lc:+.2f} | {ap:.3f} | {ac:.3f} | {ap / max(ac, 1e-9):.2f} | {cp:.3f} | {cc:.3f} | "
                   f"{cp / max(cc, 1e-9):.2f} |")
    wins = sum(1 for r in rows if r[6][0] > r[7][0])
    ratio_acc = math.exp(sum(math.log(max(r[6][1], 1e-9) / max(r[7][1], 1e-9)) for r in rows) / len(rows))
    ratio_cov = math.exp(sum(math.log(max(r[6][2], 1e-9) / max(r[7][2], 1e-9)) for r in rows) / len(rows))
    out.append(f"\nCFG++ has the higher log-density in {wins} of {len(rows)} settings; geometric-mean ratios "
               f"CFG++/CFG: accuracy {ratio_acc:.3f}, coverage {ratio_cov:.3f}.")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args(argv)
    kds, ms_classes = _imports()
    if kds is None:
        print("(COMFYUI_PATH not set: ComfyUI's own *_cfg_pp samplers are left out)")
    print("## CFG++ vs CFG at equal NFE (w = 1 + 11.5 lam), analytic class-conditional mixture")
    for kind in ("ve", "flow"):
        rows, exact = table(kind, args.batch, kds, ms_classes)
        print(render(kind, rows, exact))


if __name__ == "__main__":
    main()
