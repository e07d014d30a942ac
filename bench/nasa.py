"""NASA benchmark: how far a negative prompt pushes a cfg-1 sample from the negative prompt's own sample, vs CFG.

    COMFYUI_PATH=/opt/comfy OMP_NUM_THREADS=1 python -m bench.nasa [--seeds 8] [--steps 1 2 4] [--size 8] [--archs ...]

The claim measured (SNOOPI, arXiv 2412.02687): with NASA a 1-4 step model at cfg 1 steers away from what the
negative prompt describes. On randomly initialised ComfyUI models (the test suite's tiny SD1.5, SDXL, SD3, Flux,
Wan, Chroma, Qwen-Image, LTX-Video, AuraFlow, HiDream, Cosmos-Predict2, Lumina 2, OmniGen2, PixArt-alpha / Sigma
(40 x 40 latents, the smallest they take), real ComfyUI classes)
"what the negative prompt describes" is taken as x_neg, the sample of the negative prompt itself (same noise, same
steps, cfg 1; on HiDream with the positive's pooled vector, which modulates every block of the tiny model so strongly
that it would be most of the difference, and which NASA, as CFG's negative text, cannot reach). For each method, in
one run and side by side:
  away   = |x - x_neg| / |x_pos - x_neg|      (> 1: farther from the negative's sample than the plain prompt's)
  change = |x - x_pos| / |x_pos - x_neg|      (how much the image moved at all)
  NFE    = network evaluations per step (CFG with the negative as its unconditional prompt: 2; NASA: 1)
  time   = fastest wall clock over the seeds / plain cfg-1 sampling's (one CPU thread; the tiny models are
           overhead-bound: read time on the wider random UNet, --wide)
Means over seeds (different prompt, negative and noise per seed). Random models have no semantics, so read the
ratios (NASA vs CFG at similar change), not the absolute numbers.
"""
from __future__ import annotations

import argparse
import time

import torch

from .common import setup, wide_flux


def _setup():
    setup()


def _wide_sd15():
    """A wider random SD1.5-layout UNet (for the time overhead): 128 channels, 768-d context."""
    import comfy.supported_models as sm
    from test_nodes.tiny_models import _UNET, patcher

    cfg = sm.SD15(dict(_UNET, model_channels=128, context_dim=768, num_heads=4, num_head_channels=-1,
                       channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1], transformer_depth=[1, 1, 1],
                       transformer_depth_output=[1, 1, 1, 1, 1, 1]))
    return patcher(cfg, 0)


def _sample(model, pos, neg, noise, steps, cfg):
    import comfy.sample

    t = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, torch.zeros_like(noise), seed=0,
                              disable_pbar=True)
    return out, time.perf_counter() - t


def measure(arch, steps, seeds, size, model=None, cond=None):
    from test_nodes import tiny_models as tiny
    from trainfree.nodes.nasa import TrainFreeNASA

    model = model or tiny.build(arch)
    cond = cond or (lambda s: tiny.conditioning(arch, s))
    methods = {"cfg 1 (prompt only)": None, "NASA a=0.1": 0.1, "NASA a=0.5": 0.5, "CFG 1.5 (neg as uncond)": 1.5,
               "CFG 3 (neg as uncond)": 3.0}
    acc = {m: [0.0, 0.0, float("inf")] for m in methods}     # away, change (means), fastest run
    for seed in range(seeds):
        pos, neg = cond(1000 + seed), cond(2000 + seed)
        if arch == "hidream":   # the pooled vector (NASA leaves it to the prompt) would be most of x_pos - x_neg
            neg = [[neg[0][0], dict(neg[0][1], pooled_output=pos[0][1]["pooled_output"])]]
        side = tiny.side(arch, size)                            # PixArt takes no latent below 33 x 33
        shape = tiny.latent_shape(arch, 1, (side, side))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        x_pos, _ = _sample(model, pos, pos, noise, steps, 1.0)
        x_neg, _ = _sample(model, neg, neg, noise, steps, 1.0)
        d = float((x_pos - x_neg).norm())
        for name, p in methods.items():
            if p is None:
                x, t = _sample(model, pos, pos, noise, steps, 1.0)
            elif name.startswith("NASA"):
                x, t = _sample(TrainFreeNASA().patch(model, neg, p)[0], pos, pos, noise, steps, 1.0)
            else:
                x, t = _sample(model, pos, neg, noise, steps, p)
            acc[name][0] += float((x - x_neg).norm()) / d / seeds
            acc[name][1] += float((x - x_pos).norm()) / d / seeds
            acc[name][2] = min(acc[name][2], t)
    t0 = acc["cfg 1 (prompt only)"][2]
    return {m: (v[0], v[1], 2 if m.startswith("CFG") else 1, v[2] / t0) for m, v in acc.items()}


def timing(model, cond, channels, size, steps=4, rounds=5):
    """Fastest of ``rounds`` interleaved runs per method (one CPU is shared: interleaving spreads the noise)."""
    from trainfree.nodes.nasa import TrainFreeNASA

    pos, neg = cond(1), cond(2)
    noise = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    runs = {"cfg 1 (prompt only)": (model, pos, 1.0), "NASA a=0.5": (TrainFreeNASA().patch(model, neg, 0.5)[0], pos, 1.0),
            "CFG 3 (neg as uncond)": (model, neg, 3.0)}
    best = {k: float("inf") for k in runs}
    for _ in range(rounds):
        for k, (m, n, cfg) in runs.items():
            best[k] = min(best[k], _sample(m, pos, n, noise, steps, cfg)[1])
    return {k: v / best["cfg 1 (prompt only)"] for k, v in best.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--size", type=int, default=8, help="latent side (tiny models)")
    ap.add_argument("--archs", nargs="+",
                    default=["sd15", "sdxl", "sd3", "flux", "wan", "chroma", "qwen_image", "ltxv", "hunyuan_video",
                             "hunyuan_image", "wan_i2v", "wan_vace", "auraflow", "hidream", "cosmos_predict2",
                             "lumina2", "omnigen2", "pixart", "pixart_sigma"])
    ap.add_argument("--wide", action="store_true", help="also time wider random SD1.5 UNet and Flux DiT (32x32 latent), interleaved, fastest of 5")
    a = ap.parse_args(argv)
    _setup()
    print("| model | steps | method | away from x_neg | change | NFE/step | time vs cfg 1 |")
    print("|---|---|---|---|---|---|---|")
    for arch in a.archs:
        for steps in a.steps:
            for name, (away, change, nfe, t) in measure(arch, steps, a.seeds, a.size).items():
                print(f"| tiny {arch} | {steps} | {name} | {away:.3f} | {change:.3f} | {nfe} | {t:.2f} |")
    if a.wide:
        model = _wide_sd15()

        def cond(s):
            return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(s)), {}]]
        times = {"wide sd15 (32x32)": timing(model, cond, 4, 32)}

        def fcond(s):
            g = torch.Generator().manual_seed(s)
            return [[torch.randn(1, 64, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g),
                                                           "guidance": 3.5}]]
        times["wide flux (32x32, 64 text tokens)"] = timing(wide_flux(), fcond, 16, 32)
        print("\n| model (4 steps) | " + " | ".join(next(iter(times.values()))) + " |")
        print("|---|---|---|---|")
        for label, row in times.items():
            print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
