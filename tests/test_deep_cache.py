"""DeepCache schedule and state logic (no ComfyUI): which steps are full, which calls share a cache entry."""
import pytest
import torch

from trainfree.caching import deep_cache as dc

# Reference index lists: the official sample_from_quad_center(T, ceil(T/N), center, pow=1.4) of
# horseee/DeepCache (DeepCache/sd/pipeline_stable_diffusion.py), evaluated with numpy 2, center = 0.3 T.
OFFICIAL = {
    (50, 5): ([0, 5, 9, 13, 17, 21, 26, 31, 37, 43], 1.4),        # the paper's SD1.5 run (center 15)
    (50, 3): ([0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46], 1.4),
    (20, 5): ([0, 5, 8, 13], 1.4),
    (20, 3): ([0, 3, 5, 7, 10, 13, 16], 1.4),
    (25, 4): ([0, 4, 7, 9, 12, 16, 20], 1.4),
    (30, 2): ([0, 2, 4, 6, 7, 9, 10, 12, 13, 15, 17, 20, 22, 24, 27], 1.4),
    (13, 2): ([0, 2, 4, 5, 6, 8, 10], 1.22),                       # needs the pow decrement loop
    (20, 2): ([0, 2, 4, 6, 7, 8, 10, 12, 15, 17], 1.28),
}


def test_uniform_is_every_nth_step():
    assert dc.uniform_steps(10, 3) == [0, 3, 6, 9]
    assert dc.uniform_steps(50, 5) == list(range(0, 50, 5))
    assert dc.uniform_steps(4, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        dc.uniform_steps(10, 0)


@pytest.mark.parametrize("steps,interval", sorted(OFFICIAL))
def test_quadratic_matches_the_official_schedule(steps, interval):
    idx, p = dc.quadratic_steps(steps, interval)
    assert idx == OFFICIAL[(steps, interval)][0]
    assert p == pytest.approx(OFFICIAL[(steps, interval)][1], abs=1e-9)
    assert len(idx) == -(-steps // interval)                       # same number of full steps as uniform


def test_quadratic_is_denser_near_the_center_and_reports_impossible_cases():
    idx, _ = dc.quadratic_steps(50, 5)
    gaps = [b - a for a, b in zip(idx, idx[1:])]
    assert min(gaps) == 4 and gaps[-1] == 6                         # 4 around step 15, 6 at the end
    assert dc.quadratic_steps(10, 2, center=5)[0] is None             # no exponent > 1 gives 5 indices
    assert dc.quadratic_steps(7, 1)[0] == list(range(7))


def test_full_step_mask_window_and_fallback(monkeypatch):
    sig = torch.linspace(10.0, 0.0, 11)                               # 10 steps: sigmas 10, 9, ..., 1, 0
    mask, note = dc.full_step_mask(sig, 3, "uniform", 1e9, 0.0)
    assert mask == [i % 3 == 0 for i in range(10)] and note == ""
    mask, _ = dc.full_step_mask(sig, 3, "uniform", 8.0, 3.0)          # window: sigma in (3, 8] = steps 2..6
    assert mask == [True, True, True, False, False, True, False, True, True, True]
    mask, _ = dc.full_step_mask(sig, 3, "uniform", 3.0, 8.0)          # empty window: everything full
    assert all(mask)
    mask, _ = dc.full_step_mask(torch.linspace(50.0, 0.0, 51), 5, "quadratic", 1e9, 0.0)
    assert [i for i, m in enumerate(mask) if m] == OFFICIAL[(50, 5)][0]
    monkeypatch.setattr(dc, "quadratic_steps", lambda steps, interval: (None, 1.0))
    mask, note = dc.full_step_mask(sig, 4, "quadratic", 1e9, 0.0)
    assert [i for i, m in enumerate(mask) if m] == [0, 4, 8] and "uniform" in note
    with pytest.raises(ValueError):
        dc.full_step_mask(sig, 3, "cubic", 1e9, 0.0)


def test_step_of_maps_intermediate_evaluations_to_their_step():
    sig = [14.6, 5.0, 1.0, 0.03, 0.0]
    assert [dc.step_of(s, sig) for s in (14.6, 5.0, 1.0, 0.03)] == [0, 1, 2, 3]
    assert dc.step_of(3.0, sig) == 1 and dc.step_of(0.01, sig) == 3
    assert dc.step_of(20.0, sig) is None


def test_run_keys_decisions_and_accounting():
    run = dc.DeepCacheRun([True, False, False, True], depth=1)
    a, b = ("sig", 1), ("sig", 2)
    k0 = run.key(0, a)
    assert run.key(0, a) == (a, 1) and k0 == (a, 0)                   # same signature twice in a step (PAG)
    assert run.decide(0, k0) == "full" and run.decide(1, k0) == "full"  # nothing cached yet
    run.entries[k0] = dc.Entry()
    assert run.key(1, a) == k0                                        # a new step restarts the occurrence count
    assert run.decide(1, k0) == "cached" and run.decide(3, k0) == "full" and run.decide(None, k0) == "plain"
    assert run.decide(1, run.key(1, b)) == "full"                     # another chunk has no entry
    run.account("full", 2, 0.5)                                      # warm-up, left out of the full cost
    run.account("full", 2, 1.0)
    run.account("cached", 2, 0.25)
    run.account("cached", 2, 0.25)
    assert run.speedup() == pytest.approx(8 * 0.5 / 2.0)
    assert "2 of 4 UNet calls used the shallow branch" in run.report()
    run.clear()
    assert run.entries == {}


def test_entry_completeness_and_stand_ins():
    e = dc.Entry()
    e.shapes.update({("in", 2): (1, 8, 4, 4), ("in", 3): (1, 8, 2, 2), ("mid",): (1, 8, 2, 2),
                     ("out", 0): (1, 8, 2, 2)})
    assert not e.complete(1, 4, True)
    rec = dc.Recorder(e.__dict__, "feature", keep=True)
    x = torch.randn(1, 8, 4, 4)
    assert rec(x) is x and torch.equal(e.feature, x) and e.feature is not x
    assert e.complete(1, 4, True) and e.nbytes() == x.numel() * 4
    assert not e.complete(0, 4, True)                                 # depth 0 also skips input block 1
    opts = {"transformer_index": 3}
    z = dc.Zeros((2, 3, 4, 4), x, transformers=2, options=opts)(x)
    assert z.shape == (2, 3, 4, 4) and not z.any() and opts["transformer_index"] == 5
    r = dc.Replay(e.feature)(x)
    r += 1                                                            # callers may modify what they get
    assert torch.equal(e.feature, x)


def test_flop_ratio():
    assert dc.paper_flop_ratio(1.0, 0.2, 50, 10) == pytest.approx(50 / (10 + 40 * 0.2))
