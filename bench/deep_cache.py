"""DeepCache benchmark: DeepCache vs ComfyUI's EasyCache / LazyCache on an SD1.5-architecture U-Net, side by side.

    COMFYUI_PATH=/opt/comfy OMP_NUM_THREADS=1 python -m bench.deep_cache [--steps 20 50] [--size 24] [--width 64]
        [--full-width] [--paper-run STEPS] [--attention pytorch] [--trained SECONDS] [--vae PATH] [-v]

The real SD1.5 U-Net layout (ComfyUI's own classes and config: 4 levels, 2 res blocks each, attention at levels 0-2,
12 input / 12 output blocks) with the base width reduced from 320 to ``--width`` and random weights (torch
initialisers; the output convolution rescaled so the first prediction has unit standard deviation, like a trained
eps model). One CPU thread, dpmpp_2m / normal, cfg 7.5, cond and uncond in one chunk. Every row samples the same
noise and prompts; in one run: speed-up over the uncached run, relative RMSE of the final latent to the uncached
one and of its decoded image (``--vae PATH``: that VAE file, loaded and decoded as ComfyUI's VAELoader / VAEDecode
do; without it ComfyUI's latent preview decoder, the SD1.5 latent_rgb_factors, since no VAE weights are here; see
bench.common.Decoder; decoded after timing), extra memory held by the cache (bytes of cached tensors at the end of
the run), and the cache's own report.
Speed-ups are ratios of process CPU time (one thread, so CPU time = compute time) and, beside them, of wall-clock
time, which on a shared machine also counts other jobs' load. EasyCache / LazyCache (core defaults start 0.15 /
end 0.95) are swept over their threshold (EasyCache with cond and uncond in separate calls, see _SeparateCalls; its
speed-up is taken over the uncached run with the same split); for each DeepCache row the sweep entry closest in
CPU-time speed-up is shown (all entries with -v). A random U-Net is not a trained one, hence ``--trained``: a small
U-Net of the same layout trained here on synthetic shapes (DeepCache also at depth 1 with N = 6, 7, 8 there, to find
where depth 1 reaches the paper's 2.3x). ``--full-width`` times one full and one shallow call of the real-size
U-Net at 64x64 and counts their FLOPs (torch.utils.flop_counter) for a hardware-neutral speed-up bound;
``--paper-run 50`` samples that full-width U-Net for 50 steps uncached and with DeepCache at the paper's SD1.5
setting (N=5 quadratic, depth 1) and measures the end-to-end speed-up. ``--attention pytorch`` selects torch's
scaled_dot_product_attention, which ComfyUI uses by default on NVIDIA GPUs (``--use-pytorch-cross-attention``
elsewhere); ComfyUI's CPU default is its sub-quadratic attention, slow at the shallow branch's 4096 tokens.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from .common import Decoder, EasyCacheHeld, rel_rmse, setup

THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


def _setup(attention="default"):
    setup()
    if attention == "pytorch":                   # before comfy.ldm.modules.attention picks its function
        from comfy.cli_args import args

        args.use_pytorch_cross_attention = True
    import comfy.ldm.modules.attention as attn

    return attn.optimized_attention.__name__


def build_model(width, size, seed=0):
    import comfy.supported_models as sm
    from test_nodes.tiny_models import patcher

    cfg = sm.SD15({"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                   "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": width,
                   "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                   "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1] * 9 + [0] * 3,
                   "use_temporal_attention": False, "use_temporal_resblock": False})
    mp = patcher(cfg, seed)
    dm = mp.model.diffusion_model
    with torch.no_grad():                      # unit-variance eps at the first step, like a trained model
        x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
        std = dm(x, torch.tensor([999.0]), context=cond(0)[0][0]).std()
        dm.out[-1].weight.div_(std)
        dm.out[-1].bias.div_(std)
    return mp


def cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


class _SeparateCalls:
    """Make ComfyUI evaluate cond and uncond in separate model calls (as it does when memory is short). Core
    EasyCache 0.3.64 needs this: with both in one call its apply_cache_diff adds every cond's cached difference to
    all rows of the call (a broadcast at batch 1, a shape error at batch > 1)."""

    def __init__(self, model, on=True):
        self.base, self.on = model.model, on

    def __enter__(self):
        if self.on:
            self.base.memory_required = lambda *a, **k: 1e30
        return self

    def __exit__(self, *exc):
        self.base.__dict__.pop("memory_required", None)


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, nargs="*", default=[20, 50])
    p.add_argument("--size", type=int, default=24, help="latent side (24 = a 192x192 image)")
    p.add_argument("--width", type=int, default=64, help="base channels (SD1.5: 320)")
    p.add_argument("--full-width", action="store_true",
                   help="also time one full and one shallow call of the full-width (320) SD1.5 U-Net at 64x64")
    p.add_argument("--paper-run", type=int, default=0, metavar="STEPS",
                   help="also sample the full-width U-Net at 64x64 for STEPS steps, uncached and with DeepCache N=5 "
                        "quadratic depth 1 (the paper's SD1.5 setting; about 30 min on one CPU thread at 50 steps)")
    p.add_argument("--attention", choices=("default", "pytorch"), default="default",
                   help="ComfyUI's attention function: its default for the device (CPU: sub-quadratic) or torch SDPA "
                        "(ComfyUI's default on NVIDIA GPUs)")
    p.add_argument("--trained", type=float, default=0, metavar="SECONDS",
                   help="also train a small SD1.5-architecture U-Net on synthetic shapes for SECONDS of CPU time and "
                        "compare the caches on it (premise check: trained deep features change slowly)")
    p.add_argument("--vae", metavar="PATH", help="VAE file (SD1.5 latent space) for the decoded-image deviation; "
                   "default: ComfyUI's latent preview RGB factors")
    p.add_argument("-v", action="store_true")
    a = p.parse_args()
    print(f"attention: {_setup(a.attention)}\n")
    import comfy.patcher_extension as pe
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from trainfree.nodes import deep_cache as dcn

    logging.getLogger().setLevel(logging.WARNING)
    base = build_model(a.width, a.size)
    dec = Decoder(base, a.vae)
    run(base, 2, a.size)                                                   # warm-up
    configs = [("DeepCache N=3 uniform, depth 1", 3, 1, "uniform"),
               ("DeepCache N=5 quadratic, depth 1 (paper SD1.5)", 5, 1, "quadratic"),
               ("DeepCache N=5 quadratic, depth 0", 5, 0, "quadratic")]
    if a.steps:
        print(f"# DeepCache on an SD1.5-architecture U-Net (width {a.width} instead of 320, random weights), latent "
              f"{a.size}x{a.size}, 1 CPU thread, dpmpp_2m/normal, cfg 7.5; images decoded with {dec.label}\n")
    for steps in a.steps:
        ref, t_ref = run(base, steps, a.size)
        img = dec(ref)
        rows = [("uncached", (1.0, 1.0), 0.0, 0.0, 0, f"{t_ref[0]:.1f} s CPU, {t_ref[1]:.1f} s wall")]
        for label, n, depth, schedule in configs:
            model = dcn.TrainFreeDeepCache().patch(base, n, depth, schedule, 0.0, 1.0)[0]
            out, t = run(model, steps, a.size)
            st = model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, dcn.KEY)[0].__self__.last_stats
            rows.append((label, _ratio(t_ref, t), rel_rmse(out, ref), dec.deviation(out, img), st["bytes"],
                         f"{st['full_steps']}/{st['steps']} full steps, own estimate {st['speedup']:.2f}x"))
        sweeps = {}
        with _SeparateCalls(base):                    # EasyCache's reference: the same split, uncached
            ref_split, t_split = run(base, steps, a.size)
        rows[0] = rows[0][:5] + (rows[0][5] + f"; cond/uncond split changes it by {rel_rmse(ref_split, ref):.1e}",)
        for name, node in (("EasyCache", EasyCacheNode), ("LazyCache", LazyCacheNode)):
            sweeps[name] = []
            for thr in THRESHOLDS:
                held = EasyCacheHeld()
                m = node.execute(base, thr, 0.15, 0.95, False)[0].clone()
                m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "bench_held", held.wrapper)
                with _SeparateCalls(base, name == "EasyCache"):
                    out, t = run(m, steps, a.size)
                label = f"{name} threshold {thr}" + (" (cond/uncond in separate calls)" if name == "EasyCache" else "")
                t0 = t_split if name == "EasyCache" else t_ref       # its speed-up over the same split, uncached
                sweeps[name].append((label, _ratio(t0, t), rel_rmse(out, ref), dec.deviation(out, img), held.bytes, ""))
        ours = rows[1:]
        for r in ours:
            for name in sweeps:
                rows.append(min(sweeps[name], key=lambda s, r=r: abs(s[1][0] - r[1][0])) + (f"matched to: {r[0]}",))
        print(f"## {steps} steps\n")
        print("| method | speed-up (CPU time) | speed-up (wall) | rel. RMSE of final latent | rel. RMSE of decoded image "
              "| cache memory | notes |")
        print("|---|---|---|---|---|---|---|")
        seen = set()
        for label, sp, err, err_img, held, *note in rows:
            key = (label, note[-1] if note else "")
            if key in seen:
                continue
            seen.add(key)
            note = " ".join(n for n in note if n)
            print(f"| {label} | {sp[0]:.2f}x | {sp[1]:.2f}x | {err:.4f} | {err_img:.4f} | {held / 2**20:.2f} MiB | {note} |")
        if a.v:
            for name, entries in sweeps.items():
                print(f"\n{name} sweep (threshold: CPU speed-up / latent / image rel. RMSE): " + ", ".join(
                    f"{lab.split()[2]}: {sp[0]:.2f}x / {err:.4f} / {err_i:.4f}" for lab, sp, err, err_i, _, _ in entries))
        print()
    if a.full_width:
        full_width()
    if a.paper_run:
        paper_run(a.paper_run)
    if a.trained:
        trained(a.trained, a.steps or [20, 50], a.vae)


def call_flops(model, steps, size):
    """FLOPs of each U-Net call of a ``steps``-step run (torch.utils.flop_counter: matmul, convolution and attention
    products; norms and elementwise ops are not counted). CPU SDPA, which the counter lacks, is counted as SDPA."""
    import comfy.patcher_extension as pe
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    per_call = []

    def record(executor, *args, **kwargs):
        before = fc.get_total_flops()
        out = executor(*args, **kwargs)
        per_call.append(fc.get_total_flops() - before)
        return out

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_flops", record)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as fc:
        run(m, steps, size)
    return per_call


def full_width():
    """Cost of the shallow branch relative to a full call for the real SD1.5 U-Net size at 512x512 (64x64 latent),
    and the speed-up that ratio allows (the T·full / (|F|·full + (T−|F|)·shallow) bound, no other overheads): from
    measured CPU time, and from counted FLOPs (hardware-neutral: what a compute-bound device approaches)."""
    import comfy.patcher_extension as pe

    from trainfree.caching.deep_cache import paper_flop_ratio, quadratic_steps
    from trainfree.nodes import deep_cache as dcn

    base = build_model(320, 64)
    run(base, 1, 16)                                            # warm-up at a small size
    f5, f3 = len(quadratic_steps(50, 5)[0]), len(quadratic_steps(50, 3)[0])
    print("## Full-width SD1.5 U-Net (320 channels, random weights), 64x64 latent, batch 2 (cond+uncond), 1 thread\n")
    print(f"| cache_depth | full call | shallow call | CPU-time ratio | bound at 50 steps, N=5 ({f5} full) | N=3 ({f3} full) "
          "| full call FLOPs | shallow call FLOPs | FLOP ratio | FLOP bound, N=5 | FLOP bound, N=3 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for depth in (0, 1):
        model = dcn.TrainFreeDeepCache().patch(base, 2, depth, "uniform", 0.0, 1.0)[0]
        run(model, 2, 64)                                       # step 0 full, step 1 shallow
        st = model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, dcn.KEY)[0].__self__.last_stats
        r = st["cached_time"] / st["full_time"]
        full, shallow = call_flops(model, 2, 64)                # counted after timing, same two calls
        q = shallow / full
        print(f"| {depth} | {st['full_time']:.1f} s | {st['cached_time']:.2f} s | {r:.3f} | "
              f"{paper_flop_ratio(1.0, r, 50, f5):.2f}x | {paper_flop_ratio(1.0, r, 50, f3):.2f}x | "
              f"{full / 1e12:.2f} T | {shallow / 1e12:.3f} T | {q:.3f} | {paper_flop_ratio(1.0, q, 50, f5):.2f}x | "
              f"{paper_flop_ratio(1.0, q, 50, f3):.2f}x |", flush=True)
    print()


def paper_run(steps):
    """End-to-end speed-up of DeepCache at the paper's SD1.5 setting on the full-width U-Net at 512x512."""
    import comfy.patcher_extension as pe

    from trainfree.nodes import deep_cache as dcn

    base = build_model(320, 64)
    run(base, 1, 16)                                            # warm-up at a small size
    ref, t_ref = run(base, steps, 64)
    print(f"## Full-width SD1.5 U-Net (320 channels, random weights), 64x64 latent, {steps} steps, cfg 7.5 (cond+uncond "
          f"in one call), 1 thread; uncached: {t_ref[0]:.0f} s CPU\n")
    print("| method | speed-up (CPU time) | speed-up (wall) | rel. RMSE of final latent | cache memory | notes |")
    print("|---|---|---|---|---|---|")
    model = dcn.TrainFreeDeepCache().patch(base, 5, 1, "quadratic", 0.0, 1.0)[0]
    out, t = run(model, steps, 64)
    st = model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, dcn.KEY)[0].__self__.last_stats
    sp = _ratio(t_ref, t)
    print(f"| DeepCache N=5 quadratic, depth 1 | {sp[0]:.2f}x | {sp[1]:.2f}x | {rel_rmse(out, ref):.4f} | "
          f"{st['bytes'] / 2**20:.2f} MiB | {st['full_steps']}/{st['steps']} full steps, own estimate "
          f"{st['speedup']:.2f}x |", flush=True)
    print()


def shapes(n, size, gen):
    """Synthetic 4-channel latents: a class-dependent shape (disk, square, horizontal bar, vertical bar) at a random
    place and size with random per-channel colours, over a smooth random background gradient."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    cls = torch.randint(0, 4, (n,), generator=gen)
    cx, cy = (torch.rand(2, n, 1, 1, generator=gen) - 0.5)
    r = 0.25 + 0.25 * torch.rand(n, 1, 1, generator=gen)
    dx, dy = xx - cx, yy - cy
    masks = torch.stack([(dx ** 2 + dy ** 2).sqrt() < r, (dx.abs() < r) & (dy.abs() < r),
                         (dx.abs() < 1.6 * r) & (dy.abs() < 0.4 * r), (dx.abs() < 0.4 * r) & (dy.abs() < 1.6 * r)], 1)
    mask = masks[torch.arange(n), cls].float()
    bg = (torch.randn(n, 4, 1, 1, generator=gen) * xx + torch.randn(n, 4, 1, 1, generator=gen) * yy) * 0.3
    return bg + mask[:, None] * torch.randn(n, 4, 1, 1, generator=gen), cls


def train(model, size, seconds, emb, seed=0):
    """eps-prediction training with ComfyUI's discrete SD schedule, 15% prompt dropout (for CFG)."""
    dm, ms = model.model.diffusion_model, model.model.model_sampling
    dm.train()
    opt = torch.optim.Adam(dm.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(seed)
    t0, it, avg = time.process_time(), 0, None
    while time.process_time() - t0 < seconds:
        x0, cls = shapes(16, size, gen)
        ctx = emb[torch.where(torch.rand(16, generator=gen) < 0.15, 4, cls)]
        t = torch.randint(0, 1000, (16,), generator=gen)
        sig = ms.sigmas[t].view(-1, 1, 1, 1)
        n = torch.randn(x0.shape, generator=gen)
        loss = (dm((x0 + sig * n) / (sig ** 2 + 1).sqrt(), t.float(), context=ctx) - n).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg, it = (loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()), it + 1
    dm.eval()
    return it, avg


def trained(seconds, steps_list, vae=None, size=16, width=32):
    import comfy.patcher_extension as pe
    import comfy.sample
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from trainfree.nodes import deep_cache as dcn

    emb = torch.randn(5, 77, 768, generator=torch.Generator().manual_seed(123))    # 4 class prompts + empty
    base = build_model(width, size)
    dec = Decoder(base, vae)
    with torch.enable_grad():
        it, loss = train(base, size, seconds, emb)

    def go(model, steps):
        noise = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(11))
        c = time.process_time()
        out = comfy.sample.sample(model, noise, steps, 3.0, "dpmpp_2m", "normal", [[emb[:4], {}]],
                                  [[emb[[4] * 4], {}]], torch.zeros_like(noise), seed=11, disable_pbar=True)
        return out, time.process_time() - c

    go(base, 2)
    print(f"## Trained: SD1.5-architecture U-Net, width {width}, trained {it} iterations ({seconds:.0f} s CPU, final "
          f"loss {loss:.3f}) on synthetic {size}x{size} shapes; 4 prompts in one batch, cfg 3, dpmpp_2m/normal; "
          f"images decoded with {dec.label}\n")
    for steps in steps_list:
        ref, t_ref = go(base, steps)
        img = dec(ref)
        with _SeparateCalls(base):
            _, t_split = go(base, steps)
        print(f"### {steps} steps (uncached: {t_ref:.1f} s CPU)\n")
        print("| method | speed-up (CPU time) | rel. RMSE of final latent | rel. RMSE of decoded image | notes |\n"
              "|---|---|---|---|---|")
        for n, depth, schedule in ((3, 1, "uniform"), (5, 1, "quadratic"), (6, 1, "quadratic"), (7, 1, "quadratic"),
                                   (8, 1, "quadratic"), (5, 0, "quadratic")):
            model = dcn.TrainFreeDeepCache().patch(base, n, depth, schedule, 0.0, 1.0)[0]
            out, t = go(model, steps)
            st = model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, dcn.KEY)[0].__self__.last_stats
            print(f"| DeepCache N={n} {schedule}, depth {depth} | {t_ref / t:.2f}x | {rel_rmse(out, ref):.4f} | "
                  f"{dec.deviation(out, img):.4f} | {st['full_steps']}/{st['steps']} full steps |", flush=True)
        for name, node in (("LazyCache", LazyCacheNode), ("EasyCache", EasyCacheNode)):
            for thr in THRESHOLDS[1:]:
                with _SeparateCalls(base, name == "EasyCache"):
                    out, t = go(node.execute(base, thr, 0.15, 0.95, False)[0], steps)
                split = " (cond/uncond in separate calls)" if name == "EasyCache" else ""
                t0 = t_split if split else t_ref
                print(f"| {name} threshold {thr}{split} | {t0 / t:.2f}x | {rel_rmse(out, ref):.4f} | "
                      f"{dec.deviation(out, img):.4f} | |", flush=True)
        print()


if __name__ == "__main__":
    main()
