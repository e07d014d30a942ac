"""DeepCache: reuse a U-Net's high-level features and recompute only its shallow branch.

Paper: Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024, arXiv 2312.00858);
official code horseee/DeepCache. A U-Net has input blocks d_0..d_{L-1} (each output is a skip), a middle
block m and output blocks u_0..u_{L-1}, where u_j consumes cat(h, skip_{L-1-j}). High-level features change
slowly from step to step, so with branch depth k:

    full step (t in F):  run everything; H <- h entering u_{L-1-k}  (the deep path's output, before the cat)
    retrieve step:       run d_0..d_k (fresh skips), then u_{L-1-k}(cat(H, skip_k)), u_{L-k}, ..., u_{L-1}

k is the official helper's ``cache_branch_id`` (ComfyUI's input-block index of the deepest fresh skip;
k = 0: only the input convolution stays fresh). The paper's SD1.5 runs (``stable_diffusion.py``,
``cache_layer_id=0, cache_block_id=0``) keep the first res/attn layer fresh: k = 1.

Full-step sets F over T steps with interval N:
    uniform:    F = {0, N, 2N, ...}
    quadratic:  the official ``sample_from_quad_center(T, K=ceil(T/N), center, pow)``:
                F = {0} + {center + int(x^p) for x in linspace((-center)^(1/p), (T-center)^(1/p), K+1)}[1:-1]
                (complex powers as numpy evaluates them), with p lowered by 0.02 from 1.4 until |F| = K.

Departures from the official code: ``center`` is 30% of the steps (the official 15 of 50 steps, fixed
there whatever the step count); where no p > 1 gives K indices (the official code raises) the uniform set
is used. Steps outside [start, end] of the run are full and do not use the cache; the schedule is laid over
the steps inside it. Deep blocks are skipped, not replayed: at retrieve steps they return zeros of the
right shape (only the concatenations with the deep skips, which the cached H replaces, see them), so the
cache holds one tensor H per distinct model call (cond/uncond chunk, batch shape, patch set).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

SCHEDULES = ("uniform", "quadratic")
CENTER_FRACTION = 15 / 50      # official: center 15 at 50 steps
START_POW = 1.4                # official SD1.5 script


def _floats(sigmas) -> list:
    """The schedule as Python floats, read from the device in one transfer (not one per element)."""
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


def uniform_steps(steps: int, interval: int) -> list[int]:
    """Full steps of the uniform 1:N schedule: every N-th step from the first."""
    _check(steps, interval)
    return list(range(0, steps, interval))


def quadratic_steps(steps: int, interval: int, center: int | None = None, pow: float = START_POW):
    """The official non-uniform schedule (``sample_from_quad_center``), dense around ``center``.
    Returns (sorted full steps, the exponent used); None in place of the steps when no exponent > 1
    gives ceil(steps/interval) distinct indices."""
    _check(steps, interval)
    count = -(-steps // interval)
    if interval == 1 or count <= 1:
        return list(range(0, steps, interval)), pow
    center = round(CENTER_FRACTION * steps) if center is None else int(center)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # complex -> int cast, as in the official code
        while pow > 1:
            x = np.linspace((-center) ** (1 / pow), (steps - center) ** (1 / pow), count + 1)
            idx = [0] + [int(v) + center for v in np.unique(np.int32(x ** pow))[1:-1]]
            if len(idx) == count:
                return sorted(idx), pow
            pow -= 0.02
    return None, pow


def full_step_mask(sample_sigmas, interval: int, schedule: str, sigma_start: float, sigma_end: float):
    """Per step of a run with these sigmas (T+1 values): True where the step is evaluated in full.
    Steps with sigma outside (sigma_end, sigma_start] are full; inside, ``schedule`` picks the full ones.
    Also returns a note when the quadratic schedule fell back to uniform."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    sig = _floats(sample_sigmas)
    steps = max(len(sig) - 1, 0)
    inside = [sigma_end < sig[i] <= sigma_start for i in range(steps)]
    window = [i for i in range(steps) if inside[i]]
    mask = [not w for w in inside]
    note = ""
    if window:
        if schedule == "quadratic":
            rel, _ = quadratic_steps(len(window), interval)
            if rel is None:
                rel, note = uniform_steps(len(window), interval), "quadratic schedule impossible here: uniform used"
        else:
            rel = uniform_steps(len(window), interval)
        for r in rel:
            mask[window[r]] = True
    return mask, note


def step_of(sigma: float, sample_sigmas) -> int | None:
    """The step a model call at ``sigma`` belongs to: the last i with sample_sigmas[i] >= sigma
    (an intermediate evaluation of a multistage sampler belongs to the step it starts from)."""
    sig = _floats(sample_sigmas)
    best = None
    for i in range(len(sig) - 1):
        if sig[i] >= sigma * (1 - 1e-5) - 1e-12:
            best = i
    return best


def _check(steps, interval):
    if int(interval) < 1 or int(steps) < 0:
        raise ValueError(f"cache interval must be >= 1 and steps >= 0, got {interval}, {steps}")


class Zeros:
    """A skipped block: zeros of the shape the block produced at the last full step. ``transformers``
    keeps the host's transformer counter where running the block would have left it."""

    def __init__(self, shape, like: torch.Tensor, transformers: int = 0, options: dict | None = None):
        self.shape, self.dtype, self.device = shape, like.dtype, like.device
        self.transformers, self.options = transformers, options

    def __call__(self, x, *args, **kwargs):
        if self.transformers and self.options is not None and "transformer_index" in self.options:
            self.options["transformer_index"] += self.transformers
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


class Replay(Zeros):
    """The boundary block: returns (a copy of) the cached deep feature H."""

    def __init__(self, cached: torch.Tensor, transformers: int = 0, options: dict | None = None):
        super().__init__(cached.shape, cached, transformers, options)
        self.cached = cached

    def __call__(self, x, *args, **kwargs):
        super().__call__(x)
        return self.cached.clone()


class Recorder:
    """Appended to a block at a full step: records the block's output shape (and, at the boundary,
    a copy of the output itself) and passes it on unchanged."""

    def __init__(self, sink: dict, key, keep: bool = False):
        self.sink, self.key, self.keep = sink, key, keep

    def __call__(self, x, *args, **kwargs):
        self.sink[self.key] = x.detach().clone() if self.keep else tuple(x.shape)
        return x


class Entry:
    """What one distinct model call left at its last full step."""

    def __init__(self):
        self.shapes: dict = {}        # ("in", i) / ("mid",) / ("out", j) -> output shape
        self.feature = None           # H
        self.like = None

    def complete(self, depth: int, blocks: int, has_middle: bool) -> bool:
        need = [("in", i) for i in range(depth + 1, blocks)] + [("out", j) for j in range(blocks - 2 - depth)]
        if has_middle and depth < blocks - 1:
            need.append(("mid",))
        return self.feature is not None and all(k in self.shapes for k in need)

    def nbytes(self) -> int:
        return 0 if self.feature is None else self.feature.numel() * self.feature.element_size()


class DeepCacheRun:
    """State of one sampling run: the full-step mask, one cache entry per distinct call, counters."""

    def __init__(self, mask, depth: int):
        self.mask, self.depth = list(mask), int(depth)
        self.entries: dict = {}
        self._step, self._seen = None, {}
        self.full_calls = self.cached_calls = 0
        self.full_rows = self.cached_rows = 0
        self.full_time = self.cached_time = 0.0
        self.first_full_time = None
        self.peak_bytes = 0

    def key(self, step, signature):
        """Calls with the same signature in one step (e.g. PAG's extra pass) get their own entries."""
        if step != self._step:
            self._step, self._seen = step, {}
        n = self._seen.get(signature, 0)
        self._seen[signature] = n + 1
        return (signature, n)

    def decide(self, step, key) -> str:
        """'full' (evaluate and record), 'cached' (shallow path with the entry's H) or 'plain'."""
        if step is None or step >= len(self.mask):
            return "plain"
        if not self.mask[step] and key in self.entries:
            return "cached"
        return "full"

    def account(self, mode: str, rows: int, seconds: float) -> None:
        if mode == "cached":
            self.cached_calls, self.cached_rows, self.cached_time = (
                self.cached_calls + 1, self.cached_rows + rows, self.cached_time + seconds)
            return
        if self.first_full_time is None:
            self.first_full_time = (seconds, rows)
        self.full_calls, self.full_rows, self.full_time = (
            self.full_calls + 1, self.full_rows + rows, self.full_time + seconds)
        self.peak_bytes = max(self.peak_bytes, sum(e.nbytes() for e in self.entries.values()))

    def speedup(self) -> float:
        """Measured per-row cost of full and shallow calls, extrapolated: (all rows at the full cost) /
        (time spent). The first full call (warm-up) is left out of the full cost when there are others."""
        t, rows = self.full_time, self.full_rows
        if self.first_full_time is not None and self.full_calls > 1:
            t, rows = t - self.first_full_time[0], rows - self.first_full_time[1]
        spent = self.full_time + self.cached_time
        if rows <= 0 or spent <= 0:
            return 1.0
        return (self.full_rows + self.cached_rows) * (t / rows) / spent

    def report(self) -> str:
        total = self.full_calls + self.cached_calls
        return (f"DeepCache: {self.cached_calls} of {total} UNet calls used the shallow branch "
                f"(deep blocks skipped), {self.full_calls} full; measured UNet speed-up "
                f"{self.speedup():.2f}x; cache held {self.peak_bytes / 2**20:.2f} MiB")

    def clear(self) -> None:
        self.entries.clear()
        self._seen = {}


def now() -> float:
    return time.perf_counter()


def paper_flop_ratio(full: float, shallow: float, steps: int, full_steps: int) -> float:
    """Ideal speed-up from per-call costs: T·full / (|F|·full + (T−|F|)·shallow)."""
    return steps * full / (full_steps * full + (steps - full_steps) * shallow) if steps else 1.0


__all__ = ["uniform_steps", "quadratic_steps", "full_step_mask", "step_of", "DeepCacheRun", "Entry", "Zeros",
           "Replay", "Recorder", "SCHEDULES", "paper_flop_ratio"]
