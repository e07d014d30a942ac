"""DeepCache benchmark: DeepCache vs ComfyUI's EasyCache / LazyCache on an SD1.5-architecture U-Net, side by side.

    COMFYUI_PATH=/opt/comfy OMP_NUM_THREADS=1 python -m bench.deep_cache [--steps 20 50] [--size 32] [--width 64]

The real SD1.5 U-Net layout (ComfyUI's own classes and config: 4 levels, 2 res blocks each, attention at levels 0-2,
12 input / 12 output blocks) with the base width reduced from 320 to ``--width`` and random weights (torch
initialisers; the output convolution rescaled so the first prediction has unit standard deviation, like a trained
eps model). One CPU thread, dpmpp_2m / normal, cfg 7.5, cond and uncond in one chunk. Every row samples the same
noise and prompts; in one run: wall-clock speed-up over the uncached run, relative RMSE of the final latent to the
uncached one, extra memory held by the cache (bytes of cached tensors at the end of the run), and the cache's own
report. Speed-ups are ratios of process CPU time (one thread, so CPU time = compute time) and, beside them, of
wall-clock time, which on a shared machine also counts other jobs' load. EasyCache / LazyCache (core defaults
start 0.15 / end 0.95) are swept over their threshold; for each DeepCache row the sweep entry closest in CPU-time
speed-up is shown (all entries with -v). No VAE: the random latent has no
image to decode. A random U-Net is not a trained one: read the ratios, not the absolute errors.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


def _setup():
    torch.set_num_threads(1)
    if "trainfree" not in sys.modules:
        pkg = types.ModuleType("trainfree")
        pkg.__path__ = [str(ROOT)]
        sys.modules["trainfree"] = pkg
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    sys.path.insert(0, path)
    from harness import _torchvision_stand_in

    _torchvision_stand_in()
    from comfy.cli_args import args

    args.cpu = True


def build_model(width, size, seed=0):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    from test_nodes.tiny_models import _reinit

    cfg = sm.SD15({"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                   "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": width,
                   "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                   "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1] * 9 + [0] * 3,
                   "use_temporal_attention": False, "use_temporal_resblock": False})
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    dm = model.diffusion_model
    _reinit(dm, seed)
    dm.eval()
    with torch.no_grad():                      # unit-variance eps at the first step, like a trained model
        x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
        std = dm(x, torch.tensor([999.0]), context=cond(0)[0][0]).std()
        dm.out[-1].weight.div_(std)
        dm.out[-1].bias.div_(std)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


class _EasyHeld:
    """Bytes EasyCache / LazyCache hold at the end of the run (read before their own reset)."""

    def __init__(self):
        self.bytes = 0

    def wrapper(self, executor, *args, **kwargs):
        guider = executor.class_obj
        try:
            return executor(*args, **kwargs)
        finally:
            h = guider.model_options["transformer_options"].get("easycache")
            held = [getattr(h, n, None) for n in ("uuid_cache_diffs", "cache_diff", "x_prev_subsampled",
                                                  "output_prev_subsampled")]
            held = [v for t in held for v in (t.values() if isinstance(t, dict) else [t])]
            self.bytes = sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))


def run(model, steps, size, seed=11):
    import comfy.sample

    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    t, c = time.perf_counter(), time.process_time()
    out = comfy.sample.sample(model, noise, steps, 7.5, "dpmpp_2m", "normal", cond(5), cond(6), latent,
                              seed=seed, disable_pbar=True)
    return out, (time.process_time() - c, time.perf_counter() - t)


def _ratio(ref, t):
    return (ref[0] / t[0], ref[1] / t[1])


def rel_rmse(out, ref):
    return float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, nargs="*", default=[20, 50])
    p.add_argument("--size", type=int, default=24, help="latent side (24 = a 192x192 image)")
    p.add_argument("--width", type=int, default=64, help="base channels (SD1.5: 320)")
    p.add_argument("--full-width", action="store_true",
                   help="also time one full and one shallow call of the full-width (320) SD1.5 U-Net at 64x64")
    p.add_argument("-v", action="store_true")
    a = p.parse_args()
    _setup()
    import comfy.patcher_extension as pe
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from trainfree.nodes import deep_cache as dcn

    logging.getLogger().setLevel(logging.WARNING)
    base = build_model(a.width, a.size)
    run(base, 2, a.size)                                                   # warm-up
    configs = [("DeepCache N=3 uniform, depth 1", 3, 1, "uniform"),
               ("DeepCache N=5 quadratic, depth 1 (paper SD1.5)", 5, 1, "quadratic"),
               ("DeepCache N=5 quadratic, depth 0", 5, 0, "quadratic")]
    if a.steps:
        print(f"# DeepCache on an SD1.5-architecture U-Net (width {a.width} instead of 320, random weights), latent "
              f"{a.size}x{a.size}, 1 CPU thread, dpmpp_2m/normal, cfg 7.5\n")
    for steps in a.steps:
        ref, t_ref = run(base, steps, a.size)
        rows = [("uncached", (1.0, 1.0), 0.0, 0, f"{t_ref[0]:.1f} s CPU, {t_ref[1]:.1f} s wall")]
        for label, n, depth, schedule in configs:
            model = dcn.TrainFreeDeepCache().patch(base, n, depth, schedule, 0.0, 1.0)[0]
            out, t = run(model, steps, a.size)
            st = model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, dcn.KEY)[0].__self__.last_stats
            rows.append((label, _ratio(t_ref, t), rel_rmse(out, ref), st["bytes"],
                         f"{st['full_steps']}/{st['steps']} full steps, own estimate {st['speedup']:.2f}x"))
        sweeps = {}
        for name, node in (("EasyCache", EasyCacheNode), ("LazyCache", LazyCacheNode)):
            sweeps[name] = []
            for thr in THRESHOLDS:
                held = _EasyHeld()
                m = node.execute(base, thr, 0.15, 0.95, False)[0].clone()
                m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "bench_held", held.wrapper)
                out, t = run(m, steps, a.size)
                sweeps[name].append((f"{name} threshold {thr}", _ratio(t_ref, t), rel_rmse(out, ref), held.bytes, ""))
        ours = rows[1:]
        for r in ours:
            for name in sweeps:
                rows.append(min(sweeps[name], key=lambda s, r=r: abs(s[1][0] - r[1][0])) + (f"matched to: {r[0]}",))
        print(f"## {steps} steps\n")
        print("| method | speed-up (CPU time) | speed-up (wall) | rel. RMSE of final latent | cache memory | notes |")
        print("|---|---|---|---|---|---|")
        seen = set()
        for label, sp, err, held, *note in rows:
            key = (label, note[-1] if note else "")
            if key in seen:
                continue
            seen.add(key)
            note = " ".join(n for n in note if n)
            print(f"| {label} | {sp[0]:.2f}x | {sp[1]:.2f}x | {err:.4f} | {held / 2**20:.2f} MiB | {note} |")
        if a.v:
            for name, entries in sweeps.items():
                print(f"\n{name} sweep: " + ", ".join(f"{lab.split()[-1]}: {sp[0]:.2f}x / {err:.4f}"
                                                     for lab, sp, err, _, _ in entries))
        print()
    if a.full_width:
        full_width()


def full_width():
    """Cost of the shallow branch relative to a full call for the real SD1.5 U-Net size at 512x512 (64x64 latent),
    and the speed-up that ratio allows (the T·full / (|F|·full + (T−|F|)·shallow) bound, no other overheads)."""
    import comfy.patcher_extension as pe

    from trainfree.caching.deep_cache import paper_flop_ratio, quadratic_steps
    from trainfree.nodes import deep_cache as dcn

    base = build_model(320, 64)
    run(base, 1, 16)                                            # warm-up at a small size
    print("## Full-width SD1.5 U-Net (320 channels, random weights), 64x64 latent, batch 2 (cond+uncond), 1 thread\n")
    print("| cache_depth | full call | shallow call | ratio | bound at 50 steps, N=5 (10 full) | N=3 (17 full) |")
    print("|---|---|---|---|---|---|")
    for depth in (0, 1):
        model = dcn.TrainFreeDeepCache().patch(base, 2, depth, "uniform", 0.0, 1.0)[0]
        run(model, 2, 64)                                       # step 0 full, step 1 shallow
        st = model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, dcn.KEY)[0].__self__.last_stats
        r = st["cached_time"] / st["full_time"]
        f5, f3 = len(quadratic_steps(50, 5)[0]), len(quadratic_steps(50, 3)[0])
        print(f"| {depth} | {st['full_time']:.1f} s | {st['cached_time']:.2f} s | {r:.3f} | "
              f"{paper_flop_ratio(1.0, r, 50, f5):.2f}x | {paper_flop_ratio(1.0, r, 50, f3):.2f}x |")
    print()


if __name__ == "__main__":
    main()
