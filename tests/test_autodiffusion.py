"""Searched step schedules (the time-step part of AutoDiffusion, Li et al., ICCV 2023)."""
import pytest
import torch

from kit import reference
from kit.gmm import default_mixture
from kit.models import AnalyticModel, initial_state, noise_like
from kit.schedules import flow_linear, karras
from trainfree.samplers import SAMPLERS, SamplerInputError
from trainfree.samplers.autodiffusion import search_schedule


def _setup(kind, batch, seed, n=5):
    m = AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow", cls=torch.arange(batch) % 3, cfg=1.0)
    sig = karras(n) if kind == "ve" else flow_linear(n)
    x = initial_state(noise_like((batch, 8), seed=seed), sig[0], kind)
    return m, sig, x, reference.solve(m.exact, x, float(sig[0]), 0.0, h=1e-2)


@pytest.mark.parametrize("name, opts", [("dpmpp_2m_hb", {"beta": 1.0}), ("dc_solver", {})])
def test_searched_schedule_beats_karras_on_held_out_noise(name, opts):
    m, sig, x, ref = _setup("ve", 16, 3)
    best, score, initial = search_schedule(m, x, sig, SAMPLERS[name], ref, options=opts, budget=60, sigma_min=0.0292)
    assert score < 0.5 * initial
    held, _, xt, reft = _setup("ve", 64, 42)

    def median_error(sigmas):   # per-sample RMSE, median: a sample that switches mode is an outlier
        return float((SAMPLERS[name](held, xt.clone(), sigmas, **opts) - reft).pow(2).mean(1).sqrt().median())

    assert median_error(best) < 0.5 * median_error(sig)


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_schedule_shape_budget_and_determinism(kind):
    m, sig, x, ref = _setup(kind, 8, 5, n=6)
    runs = []
    best, score, initial = search_schedule(m, x, sig, SAMPLERS["plms"], ref, options={"order": 1}, budget=25,
                                           progress=lambda done, total: runs.append(done))
    assert runs[-1] <= 25 and m.nfe <= 25 * 6 * 8
    assert best[0] == sig[0] and best[-1] == 0 and len(best) == len(sig)
    assert bool((best[:-1] > best[1:]).all()) and score <= initial
    again = search_schedule(m, x, sig, SAMPLERS["plms"], ref, options={"order": 1}, budget=25)[0]
    assert torch.equal(best, again)


def test_refuses_schedules_it_cannot_search():
    m, sig, x, ref = _setup("ve", 2, 1)
    with pytest.raises(SamplerInputError, match="ending at sigma 0"):
        search_schedule(m, x, karras(5, zero_end=False), SAMPLERS["plms"], ref)
