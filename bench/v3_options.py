"""DPM-Solver-v3's options at few steps: every order / pseudo-order / corrector combination, calibrated.

    COMFYUI_PATH=/path/to/ComfyUI python -m bench.v3_options [--batch 8192]

The paper recommends the pseudo-order predictor at 5 steps or fewer and the corrector only in the
low-noise half ("half") at 5-6 steps with large CFG. This runs all 14 combinations of order 1 / 2 / 3,
pseudo-order and corrector full / half / off with the statistics the solver benchmark calibrates, on
the same held-out noises and default schedules, and prints each one's RMSE ratio to the best ComfyUI
built-in at NFE 5 / 6 / 8 / 10 (sorted, best first), per model type and CFG. About 30 minutes.
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch

from .__main__ import ComfyShaped, _run, _schedule, _setup_imports, calibrate_v3

NFES = (5, 6, 8, 10)


def table(kind, cfg, builtins, ms_classes, batch):
    from kit import reference
    from kit.gmm import default_mixture
    from kit.models import AnalyticModel, initial_state, noise_like
    from trainfree.samplers import SAMPLERS

    base = AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow", cls=torch.arange(batch) % 3, cfg=cfg)
    ms = ms_classes[kind]()
    base.model_sampling = ms
    model = ComfyShaped(base, ms)
    sig0 = float(_schedule(kind, 4)[0])
    x = initial_state(noise_like((batch, 8), seed=42), sig0, kind)
    ref = reference.solve(base.exact, x, sig0, 0.0)
    scale = float(ref.pow(2).mean().sqrt())

    def error(fn, opts, steps):
        out, nfe = _run(fn, model, x, _schedule(kind, steps), opts)
        return float(((out.double() - ref).pow(2).mean(1).sqrt() / scale).pow(2).mean().sqrt()), int(round(nfe))

    best = {}
    for fn in builtins.values():
        for steps in range(1, max(NFES) + 1):
            try:
                err, nfe = error(fn, {}, steps)
            except Exception:  # a built-in that cannot run this configuration
                continue
            if nfe in NFES and math.isfinite(err):
                best[nfe] = min(best.get(nfe, math.inf), err)
    ems = calibrate_v3(kind, cfg, ms_classes)
    half = float(ms.percent_to_sigma(0.5))            # as the node's corrector "half"
    half = half / (1 - half) if kind == "flow" else half
    rows = {}
    for order, pseudo, corrector in itertools.product((1, 2, 3), (False, True), ("full", "half", "off")):
        if order == 1 and (pseudo or corrector == "half"):
            continue
        opts = dict(ems=ems, order=order, pseudo=pseudo, corrector=corrector != "off")
        if corrector == "half":
            opts["corrector_sigma_max"] = half
        ratios = {}
        for steps in NFES:                             # one model call per step: NFE = steps
            err, nfe = error(SAMPLERS["dpm_solver_v3"], opts, steps)
            ratios[nfe] = err / best[nfe]
        rows[f"order {order}, pseudo {'on' if pseudo else 'off'}, corrector {corrector}"] = ratios
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192, help="held-out noises the errors are measured on")
    args = parser.parse_args()
    comfy = _setup_imports()
    if not comfy:
        raise SystemExit("set COMFYUI_PATH: the ratios are to ComfyUI's built-in samplers")
    builtins, ms_classes = comfy
    for kind, cfg in (("ve", 1.0), ("ve", 3.0), ("ve", 7.5), ("flow", 1.0), ("flow", 3.0), ("flow", 7.5)):
        rows = table(kind, cfg, builtins, ms_classes, args.batch)
        print(f"\n### {'eps/VE, Karras' if kind == 've' else 'rectified flow, linear t'}, CFG {cfg}: "
              "DPM-Solver-v3 (calibrated) / best built-in\n")
        print("| options | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
        print("|---|" + "---|" * len(NFES))
        for label, r in sorted(rows.items(), key=lambda kv: sum(kv[1].values())):
            print(f"| {label} | " + " | ".join(f"{r[n]:.2f}" for n in NFES) + " |", flush=True)


if __name__ == "__main__":
    main()
