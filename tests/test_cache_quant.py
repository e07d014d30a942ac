"""CacheQuant cache half (DPS schedule + DEC correction) and the block-span residual cache, without ComfyUI."""
import itertools

import pytest
import torch

from trainfree.caching.cache_quant import (Calibrator, Moments, SpanRun, dp_schedule, group_bounds, row_branches,
                                           schedule_error, step_of, uniform_schedule)


def brute_force(err, k, lo, hi):
    t = err.shape[0]
    best = None
    for rest in itertools.combinations(range(1, t), k - 1):
        starts = [0, *rest]
        lengths = [e - s for s, e in zip(starts, starts[1:] + [t])]
        if all(lo <= n <= hi for n in lengths):
            c = schedule_error(err, starts)
            if best is None or c < best[0] - 1e-12:
                best = (c, starts)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    t = 6 + seed % 5
    k = 2 + seed % 3
    err = torch.rand(t, t, generator=g, dtype=torch.float64) * torch.rand(t, 1, generator=g, dtype=torch.float64)
    for lo, hi in [group_bounds(t, k), (1, t)]:
        starts = dp_schedule(err, k, lo, hi)
        cost, ref = brute_force(err, k, lo, hi)
        assert schedule_error(err, starts) == pytest.approx(cost, rel=1e-12, abs=1e-12)
        lengths = [e - s for s, e in zip(starts, starts[1:] + [t])]
        assert starts[0] == 0 and len(starts) == k and all(lo <= n <= hi for n in lengths)


def test_dp_recovers_planted_change_points_and_bounds():
    feats = torch.zeros(12)
    feats[4:], feats[9:] = 5.0, 12.0                          # three regimes: [0,4), [4,9), [9,12)
    err = (feats[None, :] - feats[:, None]).abs().double()
    assert dp_schedule(err, 3, 1, 12) == [0, 4, 9]
    lo, hi = group_bounds(12, 3)                              # N = 4: lengths 2..8 (official bounds)
    assert (lo, hi) == (2, 8)
    assert group_bounds(20, 7) == (2, 5) and group_bounds(50, 50) == (1, 2)
    with pytest.raises(ValueError, match="no schedule"):
        dp_schedule(err, 2, 7, 8)
    assert uniform_schedule(10, 3) == [0, 3, 6, 9]


def test_dec_fit_recovers_affine_map_and_never_hurts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    a_true, b_true = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.3, 0.0, -1.0])
    y = x * a_true + b_true + 0.01 * torch.randn(4000, 3, generator=g, dtype=torch.float64)
    m = Moments()
    m.add(x[:2500], y[:2500])
    m.add(x[2500:], y[2500:])                                 # accumulates like one pass
    a, b = m.fit()
    assert torch.allclose(a, a_true.double(), atol=2e-3) and torch.allclose(b, b_true.double(), atol=2e-3)
    direct_plain = float(((y - x) ** 2).sum())
    direct_fit = float(((y - (x * a + b)) ** 2).sum())
    assert m.sse(False) == pytest.approx(direct_plain, rel=1e-9)
    assert m.sse(True) == pytest.approx(direct_fit, rel=1e-6)
    assert m.sse(True) < 0.001 * m.sse(False)
    same = Moments()                                          # a = 1, b = 0 already: the fit changes nothing
    same.add(x, x + 0.0)
    a1, b1 = same.fit()
    assert torch.allclose(a1, torch.ones(3, dtype=torch.float64)) and torch.allclose(b1, torch.zeros(3, dtype=torch.float64))


def test_calibrator_solves_on_recorded_residuals():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 4, generator=g)
    scale = torch.tensor([1.0, 1.02, 1.05, 3.0, 3.1, 3.15, 8.0, 8.1])   # jumps at 3 and 6
    cal = Calibrator(8, window=7)
    for i, s in enumerate(scale):
        for chunk in ("cond", "uncond"):
            cal.record(i, chunk, {"img": (base + (0.5 if chunk == "cond" else 0.0)) * s})
            cal.record(i, chunk, {"img": base * 99})          # second evaluation of the step: ignored
    out = cal.solve(3, correction=False)
    assert out["full"].nonzero().flatten().tolist() == [0, 3, 6]
    corr = cal.solve(3, correction=True)
    err_plain, err_corr = cal.error_matrix(False), cal.error_matrix(True)
    assert bool((err_corr[torch.isfinite(err_corr)] <= err_plain[torch.isfinite(err_plain)] + 1e-9).all())
    assert torch.allclose(corr["a.img"][1, 0], torch.full((4,), 1.02), atol=1e-5)   # a = scale ratio per channel
    assert torch.equal(corr["a.img"][0], torch.ones(2, 4)) and torch.equal(corr["b.img"][0], torch.zeros(2, 4))
    assert torch.equal(corr["a.img"][1, 1], torch.ones(4))        # no unconditional rows seen: identity


def test_calibrator_fits_cond_and_uncond_rows_separately():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, 3, generator=g)
    cal = Calibrator(3, window=2)
    branches = row_branches([0, 1], 4)                            # rows 0-1 cond, 2-3 uncond (one chunk)
    assert branches.tolist() == [0, 0, 1, 1]
    for i in range(3):
        grow = torch.tensor([1.0 + 0.1 * i] * 2 + [1.0 - 0.2 * i] * 2).reshape(4, 1, 1)
        cal.record(i, "chunk", {"img": base * grow}, branches)
    out = cal.solve(1, correction=True)
    assert torch.allclose(out["a.img"][2, 0], torch.full((3,), 1.2), atol=1e-5)
    assert torch.allclose(out["a.img"][2, 1], torch.full((3,), 0.6), atol=1e-5)
    assert float(cal.error_matrix(True)[0, 2]) < 1e-8 < float(cal.error_matrix(False)[0, 2])


def test_step_of():
    ss = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [step_of(s, ss) for s in (10.0, 7.0, 5.0, 2.0, 1.5, 1.0, 0.5)] == [0, 0, 1, 2, 2, 3, 3]


class ToyDiT:
    """Two streams and a span of blocks called through the ComfyUI ``patches_replace['dit']`` protocol."""

    def __init__(self, n=4, single_from=2, seed=0, img_first=False):
        g = torch.Generator().manual_seed(seed)
        self.w = [torch.randn(8, 8, generator=g) * 0.2 for _ in range(n)]
        self.n, self.single_from, self.calls, self.img_first = n, single_from, 0, img_first

    def __call__(self, img, txt, sigma, sample_sigmas, replace=None, uuids=("a",)):
        to = {"sigmas": torch.tensor([sigma]), "sample_sigmas": sample_sigmas, "uuids": list(uuids),
              "cond_or_uncond": [0]}
        for i in range(self.n):
            single = i >= self.single_from
            key = ("single_block" if single else "double_block", i)
            if single and i == self.single_from:
                img = torch.cat((img, txt) if self.img_first else (txt, img), 1)

            def original(args, i=i, single=single):
                self.calls += 1
                if single:
                    return {"img": args["img"] + torch.tanh(args["img"] @ self.w[i])}
                return {"img": args["img"] + torch.tanh(args["img"] @ self.w[i]) * sigma,
                        "txt": args["txt"] + torch.tanh(args["txt"] @ self.w[i])}

            args = {"img": img, "transformer_options": to}
            if not single:
                args["txt"] = txt
            out = replace(key, args, original) if replace is not None else original(args)
            img = out["img"]
            if not single:
                txt = out["txt"]
        return img


def _sample(model, run, steps=6, img=None, uuids=("a",)):
    ss = torch.linspace(1.0, 0.0, steps + 1)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5)) if img is None else img
    txt = torch.ones(x.shape[0], 2, 8) * 0.1
    outs = []
    for i in range(steps):
        replace = None if run is None else (lambda k, a, c: run.block(k, a, c) if k in span else c(a))
        y = model(x, txt, float(ss[i]), ss, replace=replace, uuids=uuids)
        x = x + 0.1 * (y[:, :-2] if model.img_first else y[:, 2:])     # the image tokens of the joined stream
        outs.append(y)
    return x


span = [("double_block", 1), ("single_block", 2)]


def test_span_cache_all_full_is_identical_and_cached_steps_skip_blocks():
    model = ToyDiT()
    ref = _sample(model, None)
    assert torch.equal(_sample(model, SpanRun(*span, full=[1] * 6)), ref)
    model.calls = 0
    run = SpanRun(*span, full=[1, 0, 0, 1, 0, 0])
    cached = _sample(model, run)
    assert model.calls == 6 * 4 - 4 * 2                        # 4 cached steps skip both span blocks
    assert (run.blocks_run, run.blocks_skipped) == (4, 8)
    assert run.held_bytes == 2 * 5 * 8 * 4                     # one residual [2, 2+3, 8] float32
    rel = float((cached - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel


def test_span_cache_joins_the_streams_in_the_models_order():
    """Single-stream blocks run on [txt; img] in Flux and Chroma, on [img; txt] in HunyuanVideo: the residual of a
    span crossing into them is taken against its input joined in the same order. The toy's blocks act per token,
    so both orders must give the same error; joining in the other order at least doubles it."""
    errors = {}
    for img_first in (False, True):
        model = ToyDiT(img_first=img_first)
        ref = _sample(model, None)
        for join in (img_first, not img_first):
            out = _sample(model, SpanRun(*span, full=[1, 0, 0, 1, 0, 0], img_first=join))
            errors[img_first, join == img_first] = float((out - ref).norm() / ref.norm())
    assert 0 < errors[False, True] < 0.05
    assert errors[True, True] == pytest.approx(errors[False, True], rel=1e-5)
    assert errors[False, False] > 2 * errors[False, True] and errors[True, False] > 2 * errors[True, True]


def test_span_cache_never_reuses_across_chunks_or_shapes():
    model = ToyDiT()
    run = SpanRun(*span, full=[1, 0, 0, 0])
    _sample(model, run, steps=4)
    ss = torch.linspace(1.0, 0.0, 5)
    model.calls = 0
    model(torch.randn(1, 3, 8), torch.ones(1, 2, 8), float(ss[2]), ss, uuids=("b",),   # new chunk at a cached step:
          replace=lambda k, a, c: run.block(k, a, c) if k in span else c(a))         # nothing to reuse -> full
    assert model.calls == 4
    model(torch.randn(1, 3, 8), torch.ones(1, 2, 8), float(ss[3]), ss, uuids=("b",),   # now it has its own
          replace=lambda k, a, c: run.block(k, a, c) if k in span else c(a))
    assert model.calls == 4 + 2 and len(run.entries) == 2


def test_step_weights_scale_the_reuse_errors():
    cal = Calibrator(4, window=3)
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        cal.record(i, "c", {"img": torch.randn(3, 2, generator=g)})
    assert cal.step_weights() is None                          # no sigmas seen: unweighted
    cal.sigmas = torch.tensor([1.0, 0.9, 0.5, 0.4, 0.0], dtype=torch.float64)
    w = cal.step_weights()
    assert torch.allclose(w, torch.tensor([0.01, 0.16, 0.01, 0.16], dtype=torch.float64) / 0.16)
    assert torch.allclose(cal.error_matrix(False, w)[0, 1:], cal.error_matrix(False)[0, 1:] * w[1:])


def test_a_span_whose_first_block_adds_text_tokens_names_the_fix():
    run = SpanRun("b0", "b0")
    args = {"img": torch.zeros(1, 4, 8), "txt": torch.zeros(1, 3, 8), "transformer_options": {}}
    with pytest.raises(RuntimeError, match="adds text tokens.*set head_blocks to 1 or more"):
        run.block("b0", args, lambda a: {"img": a["img"] + 1, "txt": torch.cat([a["txt"], a["txt"]], 1)})


def test_span_cache_under_torch_compile_matches_eager():
    """ComfyUI's TorchCompileModel compiles the diffusion model, span blocks' replacements included, and dynamo
    runs a frame without compiling once it hits its recompile limit: one run sees traced and plain calls. A
    traced copy of the cache's bookkeeping named patch functions wrongly (torch 2.13: ``getattr(f,
    '__qualname__', ...)`` gave the descriptor's repr), so a later plain call missed the residual stored by a
    traced one and ran in full: another result than without compilation."""
    import torch._dynamo

    def patch(args, extra):            # a block patch, as NASA or PAG put in patches_replace
        return extra["original_block"](args)

    model = ToyDiT()
    ss = torch.linspace(1.0, 0.0, 7)

    def forward(run, x, txt, sigma):
        to = {"patches_replace": {"dit": {("double_block", 0): patch}}}
        replace = (lambda k, a, c: run.block(k, dict(a, transformer_options=dict(a["transformer_options"], **to)), c)
                   if k in span else c(a))
        return model(x, txt, sigma, ss, replace=replace)

    def sample(run, traced_steps):
        torch._dynamo.reset()
        compiled = torch.compile(forward, backend="eager")
        x, txt = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5)), torch.ones(2, 2, 8) * 0.1
        try:
            for i in range(6):
                x = x + 0.1 * (compiled if i in traced_steps else forward)(run, x, txt, float(ss[i]))[:, 2:]
        finally:
            torch._dynamo.reset()
        return x

    eager_run = SpanRun(*span, full=[1, 0, 0, 1, 0, 0])
    eager = sample(eager_run, ())
    for traced in ({0, 3}, set(range(6))):
        run = SpanRun(*span, full=[1, 0, 0, 1, 0, 0])
        out = sample(run, traced)
        assert (run.blocks_run, run.blocks_skipped) == (eager_run.blocks_run, eager_run.blocks_skipped) == (4, 8)
        assert len(run.entries) == 1
        assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)


def test_a_span_of_blocks_that_read_the_text_and_return_the_image_only():
    """Wan's and Cosmos-Predict2's blocks take the text as an input and return the image stream alone. With a
    ControlNet attached, the cache takes what the model adds between span blocks into account, and must not look for
    a text output there: a cached step gets its own hints between the skipped blocks, not the full step's."""
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(8, 8, generator=g) * 0.2 for _ in range(3)]
    txt = torch.randn(1, 2, 8, generator=g)
    ss = torch.linspace(1.0, 0.0, 7)

    def forward(x, step, run, hint):
        sigma = float(ss[step])
        to = {"sigmas": torch.tensor([sigma]), "sample_sigmas": ss, "uuids": ["a"], "cond_or_uncond": [0]}
        for i in range(3):
            def block(a, i=i):
                return {"img": a["img"] + 0.5 * torch.tanh(a["img"] @ w[i] + a["txt"].mean(1, keepdim=True))}
            args = {"img": x, "txt": txt, "transformer_options": to}
            x = (run.block(i, args, block) if run is not None else block(args))["img"] + hint   # a hint after each
        return x

    def sample(run):
        x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(5))
        for step in range(6):
            x = x + 0.1 * forward(x, step, run, 0.01 * (step + 1))
        return x
    ref = sample(None)
    run = SpanRun(0, 2, full=[1, 0, 0, 1, 0, 0])
    assert run.controlled
    out = sample(run)
    assert (run.blocks_run, run.blocks_skipped) == (6, 12)
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05
    x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(6))
    run = SpanRun(0, 2, full=[1, 0])
    forward(x, 0, run, 0.5)
    a, b = forward(x, 1, run, 0.2), forward(x, 1, run, -0.1)     # cached: all three hints are this step's
    torch.testing.assert_close(a - b, torch.full_like(a, 3 * 0.3), rtol=0, atol=1e-5)
