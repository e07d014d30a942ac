"""CacheQuant's cache half for DiT block spans: dynamic-programming schedule (DPS) + decoupled error correction (DEC).

Paper: Liu, Li, Gu, "CacheQuant: Comprehensively Accelerated Diffusion Models" (CVPR 2025, arXiv 2503.01323);
official code BienLuky/CacheQuant (``quant/utils.Fisher.feature_to_interval_seq_optimal`` for DPS,
``error_dec/*/..._dec.calculate_abCov`` for DEC). Pure torch, no ComfyUI.

Cached quantity. A contiguous span of transformer blocks ("deep" blocks: all but ``head`` first and ``tail`` last)
is run at full steps; its residual ``R_i = span_out_i - span_in_i`` is stored. At a cached step ``i`` that reuses
the residual of full step ``s`` the span is skipped and its output is ``span_in_i + a_i * R_s + b_i``.

DPS (paper Sec. 3.2 / Fisher optimal segmentation): split the T steps into K contiguous groups whose first step is
full, minimising ``sum_groups sum_{i in (s_g, e_g)} err(s_g, i)`` subject to ``ceil(N/2) <= e_g - s_g <= 2N``,
N = T/K (the official code's bounds). Solved exactly by dynamic programming over (groups, covered steps).

DEC, cache term: per reused step i and channel c, the least-squares affine map of the cached feature onto the fresh
one, ``a = Cov(R_i, R_s)/Var(R_s)``, ``b = mean(R_i) - a mean(R_s)``, over calibration tokens and samples.

Departures from the paper (documented in docs/cache_quant.md):
* the cached feature is a DiT block-span residual, not DeepCache's U-Net skip feature;
* ``err(s, i)`` is the squared error left after DEC (what the sampler actually sees) instead of the uncorrected L1
  distance; with correction off it is the plain squared distance ``||R_i - R_s||^2``;
* (optional, default on) ``err(s, i)`` is weighted by ``(sigma_i - sigma_{i+1})^2``, the squared step through which
  an output error at step i enters the sample (first-order error propagation of an Euler step); measured on the
  benchmark DiT it lowers the final deviation 17-24% against uniform reuse (unweighted: 0-17%) at the same
  full-step count;
* statistics are pooled over the calibration samples and tokens, one map per step, branch (cond / uncond) and channel;
* DEC's quantisation term is out of scope (no quantisation here).
"""
from __future__ import annotations

import math

import torch

from ..samplers.common import STEP_SIGMA, precise


def _eager(fn):
    """``fn`` kept out of torch.compile's traces: it runs as plain Python between the compiled pieces. Where the
    compiler cannot load (an old torch on a newer Python), nothing is compiled and ``fn`` is returned as is."""
    try:
        return torch.compiler.disable(fn)
    except Exception:
        return fn


def _floats(sigmas) -> list:
    """The schedule as Python floats, read from the device in one transfer (not one per element)."""
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


def group_bounds(steps: int, full_steps: int) -> tuple:
    """(shortest, longest) group the official DPS allows: ceil(N/2) and 2N (at most ``steps``), N = steps / full_steps."""
    if not 1 <= full_steps <= steps:
        raise ValueError(f"full steps must be in [1, {steps}], got {full_steps}")
    n = steps / full_steps
    lo = max(1, math.ceil(n / 2 - 1e-9))
    return lo, min(steps, max(lo, int(math.floor(2 * n + 1e-9))))


def group_costs(err: torch.Tensor) -> torch.Tensor:
    """cost[s, e] = sum_{s < i < e} err[s, i]: the reuse error of a group of steps [s, e) fed by full step s."""
    t = err.shape[0]
    upper = torch.triu(err.double(), diagonal=1)
    cum = torch.cat([torch.zeros(t, 1, dtype=torch.float64), upper.cumsum(1)], 1)   # cum[s, e] = sum_{i<e}
    return cum


def dp_schedule(err: torch.Tensor, full_steps: int, lo: int | None = None, hi: int | None = None) -> list:
    """The K = full_steps group starts (full steps, first one 0) minimising the summed reuse error ``err[s, i]``
    (T x T, used for s < i), every group length in [lo, hi] (default: the paper's bounds)."""
    t = err.shape[0]
    dlo, dhi = group_bounds(t, full_steps)
    lo, hi = lo or dlo, hi or dhi
    cost = group_costs(err)
    inf = float("inf")
    best = [[inf] * (t + 1) for _ in range(full_steps + 1)]
    arg = [[-1] * (t + 1) for _ in range(full_steps + 1)]
    best[0][0] = 0.0
    for k in range(1, full_steps + 1):
        for n in range(k * lo, min(t, k * hi) + 1):
            for j in range(max(0, n - hi), n - lo + 1):
                if best[k - 1][j] == inf:
                    continue
                c = best[k - 1][j] + float(cost[j, n])
                if c < best[k][n]:
                    best[k][n], arg[k][n] = c, j
    if best[full_steps][t] == inf:
        raise ValueError(f"no schedule of {full_steps} full steps in {t} steps with group lengths in [{lo}, {hi}]")
    starts, n = [], t
    for k in range(full_steps, 0, -1):
        n = arg[k][n]
        starts.append(n)
    return starts[::-1]


def schedule_error(err: torch.Tensor, starts: list) -> float:
    """The objective DPS minimises, for any list of full steps (first one 0)."""
    bounds = list(starts) + [err.shape[0]]
    cost = group_costs(err)
    return float(sum(cost[s, e] for s, e in zip(bounds[:-1], bounds[1:])))


def uniform_schedule(steps: int, interval: int) -> list:
    """DeepCache's uniform schedule: every ``interval``-th step is full, starting at 0."""
    return list(range(0, steps, max(1, int(interval))))


class Moments:
    """Per-channel sums of (x = cached feature, y = fresh feature) pairs, float64: enough for the DEC fit and the
    squared error before and after it."""

    def __init__(self):
        self.n = 0
        self.s = None           # [5, C]: sum x, sum y, sum xx, sum xy, sum yy

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).to(precise(x)), y.reshape(-1, y.shape[-1]).to(precise(y))   # not on MPS
        s = torch.stack([x.sum(0), y.sum(0), (x * x).sum(0), (x * y).sum(0), (y * y).sum(0)]).to("cpu", torch.float64)
        self.s = s if self.s is None else self.s + s
        self.n += x.shape[0]

    def fit(self, eps: float = 1e-12) -> tuple:
        """(a, b) per channel; a = 1, b = mean difference where the cached feature is constant."""
        sx, sy, sxx, sxy, _ = self.s / self.n
        var, cov = sxx - sx * sx, sxy - sx * sy
        ok = var > eps * (1.0 + sxx)
        a = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), torch.ones_like(var))
        return a, sy - a * sx

    def sse(self, corrected: bool) -> float:
        """Summed squared error of reusing x for y: plain, or after the fitted affine map."""
        sx, sy, sxx, sxy, syy = self.s
        if not corrected:
            return float((sxx - 2 * sxy + syy).sum())
        a, b = self.fit()
        n = self.n
        r = syy - 2 * a * sxy - 2 * b * sy + a * a * sxx + 2 * a * b * sx + n * b * b
        return float(r.clamp_min(0).sum())


class Calibrator:
    """Records the span residual of every step (all steps full) and the pair moments DPS and DEC need.

    ``record(step, chunk, residual)`` takes a dict {name: tensor [..., C]}; only the first evaluation of a step per
    chunk counts (second-order samplers evaluate twice). Pairs further apart than ``window`` steps are not kept."""

    def __init__(self, steps: int, window: int):
        self.steps, self.window = steps, max(1, window)
        self.history = {}      # chunk -> list of (step, residual) within the window
        self.pairs = {}        # (s, i) -> {(name, branch): Moments}
        self.seen = set()
        self.sigmas = None     # the run's sample sigmas (set by SpanRun), for the step weights

    def record(self, step: int, chunk, residual: dict, branches=None) -> None:
        """``branches``: per batch row, 0 for a conditional and 1 for an unconditional evaluation (None: all 0)."""
        if (step, chunk) in self.seen or not 0 <= step < self.steps:
            return
        self.seen.add((step, chunk))
        hist = [(s, r) for s, r in self.history.get(chunk, []) if 0 < step - s <= self.window]
        for s, r in hist:
            ms = self.pairs.setdefault((s, step), {})
            for name, y in residual.items():
                if name not in r or r[name].shape != y.shape:
                    continue
                for br, rows in _branch_rows(branches, y.shape[0]):
                    ms.setdefault((name, br), Moments()).add(r[name][rows], y[rows])
        hist.append((step, {k: v.detach().clone() for k, v in residual.items()}))
        self.history[chunk] = hist

    def error_matrix(self, corrected: bool, weights=None) -> torch.Tensor:
        """err[s, i] (inf where not measured: too far apart or never seen), times ``weights[i]`` if given."""
        err = torch.full((self.steps, self.steps), float("inf"), dtype=torch.float64)
        for (s, i), ms in self.pairs.items():
            if ms:
                err[s, i] = sum(m.sse(corrected) for m in ms.values()) * (1.0 if weights is None else float(weights[i]))
        return err

    def step_weights(self):
        """(sigma_i - sigma_{i+1})^2 / max: how much a model-output error at step i moves the sample (Euler step)."""
        if self.sigmas is None or len(self.sigmas) != self.steps + 1:
            return None
        d = (self.sigmas[:-1] - self.sigmas[1:]).double().abs() ** 2
        return d / d.max().clamp_min(1e-30)

    def solve(self, full_steps: int, correction: bool = True, weighted: bool = True) -> dict:
        """DPS schedule and, per step, the DEC map from its group's full step: {"full": [T] int, "err": [T, T],
        "a.<name>" / "b.<name>": [T, 2, C] float32 per step, branch (cond, uncond) and channel; a = 1, b = 0 at
        full steps and for a branch the calibration never evaluated}."""
        lo, hi = group_bounds(self.steps, full_steps)
        if hi > self.window + 1:
            raise ValueError(f"calibration window {self.window} is shorter than the longest group {hi}")
        err = self.error_matrix(correction, self.step_weights() if weighted else None)
        starts = dp_schedule(torch.nan_to_num(err, posinf=1e300), full_steps, lo, hi)
        full = torch.zeros(self.steps, dtype=torch.int32)
        full[starts] = 1
        out = {"full": full, "err": err.float()}
        names = {n for ms in self.pairs.values() for n, _ in ms}
        for name in sorted(names):
            chans = next(m.s.shape[1] for ms in self.pairs.values() for (n, _), m in ms.items() if n == name)
            a, b = torch.ones(self.steps, 2, chans), torch.zeros(self.steps, 2, chans)
            if correction:
                s = 0
                for i in range(self.steps):
                    if full[i]:
                        s = i
                        continue
                    for br in (0, 1):
                        m = self.pairs.get((s, i), {}).get((name, br))
                        if m is not None:
                            ai, bi = m.fit()
                            a[i, br], b[i, br] = ai.float(), bi.float()
            out[f"a.{name}"], out[f"b.{name}"] = a, b
        return out


def _branch_rows(branches, batch):
    """[(branch, row index)] for a batch whose rows are ``branches`` (0 cond / 1 uncond)."""
    if branches is None:
        return [(0, slice(None))]
    br = torch.as_tensor(branches)
    return [(int(v), (br == v).nonzero().flatten()) for v in br.unique()]


def row_branches(cond_or_uncond, batch):
    """Per-row branch of a chunk evaluated for ``cond_or_uncond`` (ComfyUI's list, equal row blocks)."""
    cou = list(cond_or_uncond) or [0]
    if batch % len(cou):
        return torch.zeros(batch, dtype=torch.long)
    return torch.tensor([min(int(c), 1) for c in cou]).repeat_interleave(batch // len(cou))


def step_of(sigma: float, sample_sigmas) -> int:
    """Index of the sampling step an evaluation at ``sigma`` belongs to (sub-step evaluations of higher-order
    samplers count for the step they start from)."""
    ss = _floats(sample_sigmas)
    if len(ss) < 2:
        return 0
    tol = 1e-5 * max(abs(sigma), 1e-3)
    i = sum(1 for s in ss[:-1] if s >= sigma - tol) - 1
    return min(max(i, 0), len(ss) - 2)


def _reference(snap: dict, name: str, like: torch.Tensor, img_first: bool = False) -> torch.Tensor:
    """The span input matching output ``name``: the same stream, or the joined stream where the span ends in
    single-stream blocks and starts in double-stream ones: [txt; img] (Flux, Chroma), [img; txt] with ``img_first``
    (HunyuanVideo)."""
    t = snap.get(name)
    if t is not None and t.shape == like.shape:
        return t
    if name == "txt" and t is not None and t.ndim == like.ndim > 1 and like.shape[1] > t.shape[1]:
        raise RuntimeError("block cache: a patch inside the span's first block adds text tokens to the stream (such "
                           "as a guidance patch applied before the cache); set head_blocks to 1 or more so that "
                           "block runs at every step")
    if name == "img" and snap.get("txt") is not None and snap.get("img") is not None:
        t = torch.cat((snap["img"], snap["txt"]) if img_first else (snap["txt"], snap["img"]), 1)
        if t.shape == like.shape:
            return t
    raise RuntimeError(f"block cache: the span's output {name!r} {tuple(like.shape)} matches none of its inputs "
                       f"{ {k: tuple(v.shape) for k, v in snap.items()} }; this model's block layout is unsupported")


def _name(f) -> str:
    """A patch function by what it is, not where it lives: closures rebuilt at every step (PAG's perturbed pass)
    keep one name, so their pass finds its cache again (an id() would change every step, or be reused by chance)."""
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


def _added(added: dict, out: dict, args: dict, img_first: bool = False) -> dict:
    """``added`` plus what the model put on the stream between a span block's output ``out`` and the next span
    block's input ``args`` (Flux's ControlNet residuals, Wan VACE's hints), in the next block's form ([txt; img] once
    the span crosses into single-stream blocks; a stream the blocks read but do not return, Wan's text, is none). The
    cached residual leaves these out, so a cached step gets the current step's additions, not its full step's."""
    now = {}
    for k in ("img", "txt"):
        a = args.get(k)
        if isinstance(a, torch.Tensor) and k in out:
            now[k] = _reference(added, k, a, img_first) + (a - _reference(out, k, a, img_first))
    return now


class SpanRun:
    """One sampling run of the residual cache over the block span ``first`` .. ``last`` (block keys).

    ``block(key, args, call)`` is what every span block's replacement does (``call(args)`` runs the block, or the
    replacement that was there before). ``full[i]`` says whether step i runs the span; ``corr`` maps an output
    name to per-step DEC tensors (a [T, 2, C], b [T, 2, C]: per branch cond / uncond); ``calibrator`` records every
    full residual. Caches are kept per chunk (cond uuids, cond/uncond layout, shapes), so chunks and resolutions never
    share a residual.
    ``img_first``: single-stream blocks run on [img; txt] (HunyuanVideo), not [txt; img] (Flux, Chroma)."""

    def __init__(self, first, last, full=None, corr=None, calibrator=None, img_first=False):
        self.first, self.last, self.full, self.corr, self.calibrator = first, last, full, corr or {}, calibrator
        self.img_first, self.entries, self.current, self.step = img_first, {}, None, 0
        self.blocks_run = self.blocks_skipped = self.held_bytes = 0
        self.cached_now, self._ab = False, {}
        self.controlled = True  # a ControlNet may add between blocks (the caller clears it when none is attached)
        self.hinted = False     # the network itself adds between blocks in every forward (VACE's control hints)
        self.times = []        # (cached?, seconds) per timed evaluation, filled by the caller

    def is_full(self, step: int) -> bool:
        return self.full is None or step >= len(self.full) or bool(self.full[step])

    def _chunk(self, args):
        """What a cached residual may be reused for: the same conds (uuids), cond/uncond layout, shapes and patches
        (an extra pass with other patches, like PAG's perturbed one, must not share the plain pass's residual)."""
        to = args.get("transformer_options") or {}
        shapes = tuple(tuple(args[k].shape) for k in ("img", "txt") if isinstance(args.get(k), torch.Tensor))
        patches = tuple(sorted((str(n), str(k), _name(f)) for n, d in (to.get("patches_replace") or {}).items()
                               if isinstance(d, dict) for k, f in d.items()))
        patches += tuple(sorted((str(n), tuple(_name(f) for f in fs)) for n, fs in (to.get("patches") or {}).items()
                                if isinstance(fs, (list, tuple))))
        marks = tuple(sorted((k, str(v)) for k, v in to.items() if k.endswith("_perturbed")))   # e.g. PAG's pass
        return (tuple(str(u) for u in to.get("uuids", ())), tuple(to.get("cond_or_uncond", ())), shapes, patches,
                marks)

    def _correct(self, name, r, branches):
        if name not in self.corr:
            return r
        key = (name, self.step, tuple(branches.tolist()), r.device, r.dtype)
        if key not in self._ab:
            shape = (r.shape[0],) + (1,) * (r.ndim - 2) + (r.shape[-1],)
            a, b = (t[self.step][branches].reshape(shape).to(r.device, r.dtype) for t in self.corr[name])
            self._ab[key] = (a, b)
        a, b = self._ab[key]
        return r * a + b

    def block(self, key, args, call):
        """Run span block ``key`` through ``call`` or skip it. Only ``call`` is traced when the model runs under
        torch.compile: the decisions and the residual bookkeeping live in helpers the compiler leaves alone (traced,
        they named patch functions wrongly in torch 2.13, so a later untraced call missed its residual: one more
        full evaluation, another result)."""
        action = self._enter(key, args)
        if action == "skip":
            return self._skip(key, args)
        out = call(args)
        if action == "run":
            self._leave(key, out)
        return out

    @_eager
    def _enter(self, key, args) -> str:
        """'run' (evaluate and record), 'skip' (reuse the residual) or 'plain' (the span was entered mid-way)."""
        if key == self.first:
            to = args.get("transformer_options") or {}
            if to.get("sigmas") is not None and to.get("sample_sigmas") is not None:
                at = to.get(STEP_SIGMA)                      # a sampler calling at a shifted sigma names its step
                self.step = step_of(float(to["sigmas"].reshape(-1)[0]) if at is None else float(at),
                                    to["sample_sigmas"])
                if self.calibrator is not None and self.calibrator.sigmas is None:
                    self.calibrator.sigmas = to["sample_sigmas"].detach().to("cpu", torch.float64)
            chunk = self._chunk(args)
            cached = not self.is_full(self.step) and chunk in self.entries
            snap = {k: args[k].clone() for k in ("img", "txt") if isinstance(args.get(k), torch.Tensor)}
            branches = row_branches(to.get("cond_or_uncond", ()), args["img"].shape[0])
            self.current = (chunk, cached, snap, branches, {"added": {k: torch.zeros_like(v) for k, v in snap.items()}})
            self.cached_now = self.cached_now or cached
        if self.current is None:                      # span entered mid-way: never cache
            return "plain"
        if self.current[1]:
            return "skip"
        between = self.current[4]
        if "out" in between:                          # what the model added since the previous span block
            between["added"] = _added(between["added"], between["out"], args, self.img_first)
        return "run"

    @_eager
    def _leave(self, key, out):
        chunk, _, snap, branches, between = self.current
        if key != self.last and self.controlled:      # a copy: Flux adds ControlNet residuals to it in place
            between["out"] = {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}
        self.blocks_run += 1
        if key == self.last:
            added = between["added"]
            res = {k: (v - _reference(snap, k, v, self.img_first) - _reference(added, k, v, self.img_first)
                       if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
            self.entries[chunk] = res
            self.current = None
            self.held_bytes = max(self.held_bytes, sum(t.numel() * t.element_size() for r in self.entries.values()
                                                       for t in r.values() if isinstance(t, torch.Tensor)))
            if self.calibrator is not None:
                self.calibrator.record(self.step, chunk, {k: v for k, v in res.items()
                                                          if isinstance(v, torch.Tensor)}, branches)

    @_eager
    def _skip(self, key, args):
        chunk, _, _, branches, _ = self.current
        self.blocks_skipped += 1
        if key != self.last:         # skipped: inputs passed on (the first copied: VACE adds to them in place)
            return {k: args[k].clone() if key == self.first and isinstance(args[k], torch.Tensor) else args[k]
                    for k in ("img", "txt") if k in args}
        self.current = None                           # the last block's input: the span input plus what the model
        here = {k: args[k] for k in ("img", "txt") if isinstance(args.get(k), torch.Tensor)}   # added since (fresh)
        return {k: (_reference(here, k, r, self.img_first) + self._correct(k, r, branches)
                    if isinstance(r, torch.Tensor) else r) for k, r in self.entries[chunk].items()}

    def clear(self):
        self.entries.clear()
        self.current = None
        self._ab.clear()
