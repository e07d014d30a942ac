"""DeepCache as a MODEL patch for ComfyUI's U-Nets (SD1.x, SD2.x, SDXL, SVD): no copy of the forward.

How the deep blocks are skipped without touching ``UNetModel._forward``: the U-Net's ``input_blocks``,
``middle_block`` and ``output_blocks`` are replaced by object patches (``add_object_patch``) that hold the
very same child modules (same names, weights, LoRA keys) and differ only in how they *iterate*: while a
keyed DIFFUSION_MODEL wrapper has set a plan for the current call, iterating a deep block yields a cheap
stand-in (zeros of the block's recorded output shape; the boundary block replays the cached feature H), and
at full steps yields the real layers plus a recorder. Outside a plan they iterate like the originals. ControlNet
residuals, input/output block patches and attention patches run as usual on the fresh blocks. An OUTER_SAMPLE
wrapper gives every sampling run fresh state, frees it at the end (also on interrupt), and reports.
"""
from __future__ import annotations

import logging

import comfy.model_patcher
import comfy.patcher_extension as pe
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel

from ..caching.deep_cache import (SCHEDULES, DeepCacheRun, Entry, Recorder, Replay, Zeros, full_step_mask, now,
                                  step_of)
from ..samplers.common import STEP_SIGMA
from .ui_support import compile_note, report_run

KEY = "trainfree_deep_cache"
PAPER = "Ma, Fang, Wang, DeepCache: Accelerating Diffusion Models for Free (CVPR 2024)"
OTHER_CACHES = ("easycache", "lazycache", "trainfree_cache_quant", "trainfree_dit_cache")
log = logging.getLogger("trainfree")


def _transformers(block) -> int:
    return sum(isinstance(layer, SpatialTransformer) for layer in block)


class _Plan:
    """What the patched block lists yield during one model call."""

    def __init__(self, mode, entry, depth, blocks, has_middle, options, like, transformers):
        self.mode, self.entry, self.depth, self.blocks = mode, entry, depth, blocks
        self.has_middle, self.options, self.like, self.tr = has_middle, options, like, transformers
        self.boundary = blocks - 1 - depth      # first fresh output block; H enters it
        self.used = 0

    def _zeros(self, key, kind_index):
        return [Zeros(self.entry.shapes[key], self.like, self.tr[kind_index], self.options)]

    def inputs(self, blocks):
        self.used += 1
        if self.mode == "full":
            return [list(b) + [Recorder(self.entry.shapes, ("in", i))] if i > self.depth else b
                    for i, b in enumerate(blocks)]
        return [b if i <= self.depth else self._zeros(("in", i), ("in", i)) for i, b in enumerate(blocks)]

    def middle(self, layers):
        self.used += 1
        last = self.boundary == 0
        if self.mode == "full":
            rec = Recorder(self.entry.__dict__, "feature", keep=True) if last else Recorder(self.entry.shapes, ("mid",))
            return list(layers) + [rec]
        if last:
            return [Replay(self.entry.feature, self.tr[("mid",)], self.options)]
        return self._zeros(("mid",), ("mid",))

    def outputs(self, blocks):
        self.used += 1
        out = []
        for j, b in enumerate(blocks):
            if j >= self.boundary:
                out.append(b)
            elif self.mode == "full":
                rec = (Recorder(self.entry.__dict__, "feature", keep=True) if j == self.boundary - 1
                       else Recorder(self.entry.shapes, ("out", j)))
                out.append(list(b) + [rec])
            elif j == self.boundary - 1:
                out.append([Replay(self.entry.feature, self.tr[("out", j)], self.options)])
            else:
                out.append(self._zeros(("out", j), ("out", j)))
        return out


class _Blocks(torch.nn.ModuleList):
    """``input_blocks`` / ``output_blocks`` with the same children; iteration follows the controller's plan."""

    def __init__(self, modules, controller, kind):
        super().__init__(list(modules))
        self.trainfree_controller, self.trainfree_kind = controller, kind

    def __iter__(self):
        plan = self.trainfree_controller.plan
        if plan is None:
            return super().__iter__()
        blocks = list(super().__iter__())
        return iter(plan.inputs(blocks) if self.trainfree_kind == "in" else plan.outputs(blocks))


class _Middle(TimestepEmbedSequential):
    """``middle_block`` with the same children; iteration follows the controller's plan."""

    def __init__(self, modules, controller):
        super().__init__(*list(modules))
        self.trainfree_controller = controller

    def __iter__(self):
        plan = self.trainfree_controller.plan
        layers = super().__iter__()
        return layers if plan is None else iter(plan.middle(list(layers)))


def _signature(x, options):
    replaced = options.get("patches_replace", {}) or {}
    patches = tuple(sorted((str(name), tuple(sorted(map(repr, d)))) for name, d in replaced.items()))
    return (tuple(x.shape), str(x.dtype), str(x.device), tuple(options.get("cond_or_uncond", ()) or ()),
            tuple(map(str, options.get("uuids", ()) or ())), patches)


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    elif x.device.type == "mps":
        torch.mps.synchronize()


def conflicts(model_options, wrappers) -> list:
    found = []
    options = model_options.get("transformer_options", {})
    holder = options.get("easycache")
    if holder is not None:
        found.append(getattr(holder, "name", "EasyCache/LazyCache"))
    found += [str(k) for k in options if str(k).startswith(OTHER_CACHES[2:])]
    for per_type in wrappers.values():
        for key in per_type:
            if any(str(key).startswith(k) for k in OTHER_CACHES):
                found.append(str(key))
    return sorted(set(found))


class _Controller:
    def __init__(self, interval, depth, schedule, start, end, blocks, has_middle, transformers, node_id):
        self.interval, self.depth, self.schedule, self.start, self.end = interval, depth, schedule, start, end
        self.blocks, self.has_middle, self.tr, self.node_id = blocks, has_middle, transformers, node_id
        self.plan = None
        self.last_report, self.last_stats = None, None

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        other = conflicts(guider.model_options, {**guider.model_patcher.wrappers,
                                                 **guider.model_options["transformer_options"].get("wrappers", {})})
        if other:
            raise RuntimeError(f"DeepCache (TrainFree) cannot run together with another step cache on the same "
                               f"model ({', '.join(other)}): both would skip work on the same calls. Use one.")
        ms = guider.model_patcher.get_model_object("model_sampling")
        mask, note = full_step_mask(args[3], self.interval, self.schedule, ms.percent_to_sigma(self.start),
                                    ms.percent_to_sigma(self.end))
        run = DeepCacheRun(mask, self.depth)
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options["transformer_options"][KEY] = run
        self.plan, t0, done = None, now(), False
        try:
            out = executor(*args, **kwargs)
            done = True
            return out
        finally:
            self.plan = None
            guider.model_options = original
            text = (f"{run.report()}; {sum(mask)} of {len(mask)} steps full; sampling took {now() - t0:.2f} s"
                    + (f" ({note})" if note else "") + compile_note(original)
                    + ("" if done else " [run interrupted; cache freed]"))
            self.last_stats = {"full": run.full_calls, "cached": run.cached_calls, "speedup": run.speedup(),
                               "bytes": run.peak_bytes, "full_steps": sum(mask), "steps": len(mask),
                               "full_time": run.full_time, "cached_time": run.cached_time}
            run.clear()
            self.last_report = text
            report_run(text, self.node_id)

    def diffusion_model(self, executor, x, *args, **kwargs):
        options = kwargs.get("transformer_options", args[-1] if args and isinstance(args[-1], dict) else {})
        run = options.get(KEY)
        if run is None or self.plan is not None:
            return executor(x, *args, **kwargs)
        sigma, sample_sigmas = options.get("sigmas"), options.get("sample_sigmas")
        if options.get(STEP_SIGMA) is not None:          # a sampler calling at a shifted sigma names its step
            sigma = torch.tensor([options[STEP_SIGMA]])
        step = None if sigma is None or sample_sigmas is None else step_of(float(sigma.max()), sample_sigmas)
        key = run.key(step, _signature(x, options))
        mode = run.decide(step, key)
        if mode == "plain":
            return executor(x, *args, **kwargs)
        entry = run.entries.get(key)
        if mode == "cached" and not entry.complete(self.depth, self.blocks, self.has_middle):
            mode = "full"
        if mode == "full":
            entry = Entry()
        plan = _Plan(mode, entry, self.depth, self.blocks, self.has_middle, options, x, self.tr)
        _sync(x)
        t0 = now()
        self.plan = plan
        try:
            out = executor(x, *args, **kwargs)
        finally:
            self.plan = None
        _sync(x)
        if mode == "full" and entry.complete(self.depth, self.blocks, self.has_middle):
            run.entries[key] = entry
        if plan.used < 2:            # block lists not patched in (object patches stripped): ran in full
            mode = "full"
        run.account(mode, x.shape[0], now() - t0)
        return out


def unet_of(model):
    """The U-Net of ``model``, or a ValueError naming what the model is."""
    dm = model.get_model_object("diffusion_model")
    ok = isinstance(dm, UNetModel) and len(dm.input_blocks) == len(dm.output_blocks) >= 2
    if not ok:
        raise ValueError(f"DeepCache needs a U-Net with long skip connections (SD1.x, SD2.x, SDXL, SVD); this model "
                         f"is {type(model.model).__name__} with a {type(dm).__name__}, which has none. For DiT/flow "
                         f"models use the DiT Block Cache (TrainFree; Flux, Chroma, SD3, Wan, HunyuanVideo, "
                         f"Qwen-Image, LTX-Video, AuraFlow, Lumina 2, OmniGen2, HiDream, Cosmos-Predict2, PixArt) or "
                         f"core EasyCache.")
    return dm


class TrainFreeDeepCache:
    DESCRIPTION = ("DeepCache for U-Nets (SD1.x/SD2.x/SDXL/SVD): on full steps the whole U-Net runs and the deep "
                   "feature entering the shallow output blocks is cached; on the steps in between only the shallow "
                   "branch (the first input blocks and the last output blocks) runs, reusing that feature. Works "
                   "with CFG batching, batches, ControlNet, LoRA, PAG and Adaptive Guidance. After each run it logs "
                   f"(and shows here) how many calls were shortened and the measured speed-up. From {PAPER}.")
    CATEGORY = "trainfree/caching"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with DeepCache; state is fresh for every sampling run.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A U-Net model (SD1.x, SD2.x, SDXL, SVD). DiT/flow models are refused."}),
            "cache_interval": ("INT", {"default": 5, "min": 1, "max": 100, "tooltip":
                                       "N: one full U-Net step per N steps on average (1 = off). Paper: N=5 "
                                       "(non-uniform) for its SD1.5 2.3x figure; 3 is gentler."}),
            "cache_depth": ("INT", {"default": 1, "min": 0, "max": 11, "tooltip":
                                    "Branch depth: index of the deepest input block (skip) that is recomputed at "
                                    "cached steps (DeepCache's cache_branch_id). 0 = only the input convolution "
                                    "(fastest); 1 = paper's SD runs (first res/attn layer); higher = closer to the "
                                    "uncached result, less speed-up. At most the U-Net's input blocks - 1 "
                                    "(11 for SD1.5, 8 for SDXL)."}),
            "schedule": (list(SCHEDULES), {"default": "quadratic", "tooltip":
                                           "Where the full steps go: 'uniform' = every N-th step; 'quadratic' = the "
                                           "paper's non-uniform schedule (power 1.4, denser around 30% of the steps), "
                                           "same number of full steps."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                        "Caching starts at this point of the denoising (0 = first step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                      "Caching stops after this point (1 = last step). Steps outside run in full."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def patch(self, model, cache_interval, cache_depth, schedule, start_percent, end_percent, unique_id=None):
        if start_percent > end_percent:
            raise ValueError(f"DeepCache: start_percent ({start_percent}) is after end_percent ({end_percent}): "
                             "no step would be cached")
        dm = unet_of(model)
        blocks = len(dm.input_blocks)
        has_middle = dm.middle_block is not None
        deepest = blocks - 1 if has_middle else blocks - 2
        if not 0 <= int(cache_depth) <= deepest:
            raise ValueError(f"cache_depth {cache_depth} does not fit this U-Net ({type(model.model).__name__}): it "
                             f"has {blocks} input blocks, so cache_depth must be 0..{deepest}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if any(KEY in per_type for per_type in model.wrappers.values()):
            raise ValueError("DeepCache (TrainFree) is already applied to this model; apply it once.")
        other = conflicts(model.model_options, model.wrappers)
        if other:
            raise ValueError(f"this model already has another step cache ({', '.join(other)}); DeepCache would "
                             f"skip work on the same calls. Use one cache per model.")
        tr = {("in", i): _transformers(b) for i, b in enumerate(dm.input_blocks)}
        tr.update({("out", j): _transformers(b) for j, b in enumerate(dm.output_blocks)})
        tr[("mid",)] = _transformers(dm.middle_block) if has_middle else 0
        ctl = _Controller(int(cache_interval), int(cache_depth), schedule, float(start_percent), float(end_percent),
                          blocks, has_middle, tr, unique_id)
        m = model.clone()
        part = model.get_model_object
        m.add_object_patch("diffusion_model.input_blocks", _Blocks(part("diffusion_model.input_blocks"), ctl, "in"))
        m.add_object_patch("diffusion_model.output_blocks", _Blocks(part("diffusion_model.output_blocks"), ctl, "out"))
        if has_middle:
            m.add_object_patch("diffusion_model.middle_block", _Middle(part("diffusion_model.middle_block"), ctl))
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, ctl.outer_sample)
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, ctl.diffusion_model)
        return (m,)


NODES = {"TrainFreeDeepCache": (TrainFreeDeepCache, "DeepCache (TrainFree)")}
DROPDOWN = {}
