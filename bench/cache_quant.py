"""DiT block cache benchmark: CacheQuant schedule (DPS + DEC) vs uniform reuse vs ComfyUI's EasyCache / LazyCache.

    COMFYUI_PATH=/opt/comfy OMP_NUM_THREADS=1 python -m bench.cache_quant [--steps 20 50] [--size 32] [--repeats 2]
        [--vae PATH] [-v]

A randomly initialised Flux-architecture DiT (ComfyUI's own classes, torch initialisers; hidden 256, 4 double + 8
single blocks) on one CPU thread, cfg 1 like Flux-dev. Every row samples the same noise and prompt (different from
the calibration prompt and seed) with euler / simple; in one run, side by side: speed-up over the uncached run in
process CPU time (steadier on a shared machine: 1 thread, so CPU time is the computation) and in wall-clock time,
each timed in pairs with an uncached run right before it (median of --repeats pairs), relative RMSE of the final
latent to the uncached one and of its decoded image (``--vae PATH``: a Flux VAE file, loaded and decoded as ComfyUI's
VAELoader / VAEDecode do; without it ComfyUI's latent preview decoder, Flux's latent_rgb_factors and bias, since no VAE
weights are here; see bench.common.Decoder; decoded after timing), extra memory the cache holds (bytes of cached
tensors: our residuals; EasyCache/LazyCache's cached output difference), the cache's own speed-up report.
EasyCache / LazyCache thresholds are swept (all printed with -v; else the rows nearest our speed-ups).
A random DiT is not a trained one: trajectories are smoother or rougher than real ones, so read the ratios, not the
absolute errors.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from .common import Decoder, EasyCacheHeld, rel_rmse, setup, wide_flux


def _setup():
    setup()


def build_model(seed=0):
    return wide_flux(seed)


def cond(seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 32, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g), "guidance": 3.5}]]


def _clone_input(executor, x, *args, **kwargs):
    """Outermost DIFFUSION_MODEL wrapper for EasyCache rows. EasyCache's ``apply_cache_diff`` adds to the model
    input in place (``x += diff``); for a float32 flow model that input is the very tensor ``calculate_denoised``
    uses afterwards (``CONST.calculate_input`` returns it, ``.to(float32)`` does not copy), which corrupts every
    skipped step (final-latent RMSE ~0.8 here). In bf16/fp16 inference the cast copies it, so real users don't see
    this: the copy reproduces that, to compare with EasyCache as it behaves in practice."""
    return executor(x.clone(), *args, **kwargs)


def run(model, steps, size, seed=11, prompt=5, repeats=1):
    """Final latent, best wall-clock and best process CPU time of ``repeats`` runs."""
    import comfy.sample

    latent = torch.zeros(1, 16, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond(prompt), cond(prompt + 1), latent,
                                  seed=seed, disable_pbar=True)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return out, wall, cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--size", type=int, default=32, help="latent side (32 = 256 image tokens)")
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=1, help="timed (uncached, row) pairs per row (median ratio)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                   help="EasyCache / LazyCache reuse thresholds swept")
    p.add_argument("--vae", metavar="PATH", help="VAE file (Flux latent space) for the decoded-image deviation; "
                   "default: ComfyUI's latent preview RGB factors")
    p.add_argument("-v", action="store_true")
    a = p.parse_args()
    _setup()
    import tempfile

    import comfy.patcher_extension as pe
    import folder_paths
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from trainfree.nodes import cache_quant as cq

    logging.getLogger().setLevel(logging.WARNING)
    folder_paths.folder_names_and_paths["trainfree"] = ([tempfile.mkdtemp()], {".safetensors"})
    base = build_model()
    a.decoder = Decoder(base, a.vae)
    run(base, 2, a.size)                                      # warm-up (first-call overheads)
    print(f"# DiT block cache on a random Flux-architecture DiT (hidden 256, 4+8 blocks, {a.size // 2}^2 image "
          f"tokens), 1 CPU thread, euler/simple, cfg 1; images decoded with {a.decoder.label}\n")
    for steps in a.steps:
        table(base, steps, a, cq, pe, EasyCacheNode, LazyCacheNode)


def table(base, steps, a, cq, pe, EasyCacheNode, LazyCacheNode):
    ref, t_ref, c_ref = run(base, steps, a.size)
    img = a.decoder(ref)
    rows = [("uncached", 1.0, 1.0, 0.0, 0.0, 0, "")]

    def measure(label, model, extra_bytes=None):
        """Timed in pairs (uncached run, then this one) so both see the same load on a shared machine."""
        cpu, wall = [], []
        for _ in range(a.repeats):
            _, tr, cr = run(base, steps, a.size)
            out, t, c = run(model, steps, a.size)
            cpu.append(cr / c)
            wall.append(tr / t)
        err, err_img = rel_rmse(out, ref), a.decoder.deviation(out, img)            # decoded after timing
        cfg = model.model_options["transformer_options"].get(cq.KEY)
        held, note = extra_bytes() if extra_bytes else (0, "")
        if cfg is not None and cfg.last_report:
            note = cfg.last_report.split(": ", 1)[1].split("; cache held")[0]
            held = cfg.last_held
        return (label, statistics.median(cpu), statistics.median(wall), err, err_img, held, note)

    for n in a.intervals:
        rows.append(measure(f"ours uniform N={n} (no calibration)", cq.TrainFreeDiTCache().patch(base, n, 1, 1)[0]))
        for corr, weighted, label in ((False, False, "DPS (paper's objective)"), (False, True, "DPS step-weighted"),
                                      (True, True, "DPS step-weighted + DEC")):
            sch = cq.TrainFreeCacheQuantCalibrate().calibrate(
                base, cond(1), cond(2), {"samples": torch.zeros(2, 16, a.size, a.size)}, 0, steps, 1.0, "euler",
                "simple", n, 1, 1, corr, f"bench_{steps}_{n}_{corr}_{weighted}", True, weighted)[0]
            rows.append(measure(f"ours CacheQuant N={n} {label}",
                                cq.TrainFreeDiTCache().patch(base, n, 1, 1, schedule=sch)[0]))
    ours = [r for r in rows if r[0].startswith("ours")]
    sweep = []
    for node, name in ((EasyCacheNode, "EasyCache"), (LazyCacheNode, "LazyCache")):
        for thr in a.thresholds:
            probe = EasyCacheHeld()
            m = base.clone()
            if name == "EasyCache":   # see _clone_input
                m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_clone_input", _clone_input)
            m = node.execute(m, thr, 0.15, 0.95, False)[0].clone()
            m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "bench_bytes", probe.wrapper)
            sweep.append(measure(f"{name} threshold {thr}", m, lambda probe=probe: (probe.bytes, probe.note)))
    keep = {min((s for s in sweep if s[0].startswith(name)), key=lambda s: abs(s[1] - o[1]))
            for o in ours for name in ("EasyCache", "LazyCache")}
    rows += sorted(keep, key=lambda r: r[0]) if not a.v else sweep
    print(f"## {steps} steps (uncached: {c_ref:.2f} s CPU, {t_ref:.2f} s wall)\n")
    print("| method | speed-up (CPU time) | speed-up (wall clock) | rel. RMSE of final latent | rel. RMSE of decoded "
          "image | extra memory held | cache's own report |")
    print("|---|---|---|---|---|---|---|")
    for label, sp, wall, err, err_img, held, note in rows:
        print(f"| {label} | {sp:.2f}x | {wall:.2f}x | {err:.4f} | {err_img:.4f} | {held / 1024:.0f} KiB | {note} |")
    print(flush=True)


if __name__ == "__main__":
    main()
