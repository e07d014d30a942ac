"""DC-Solver (Zhao et al., ECCV 2024): its UniPC base, the compensation, the ratio search and CPR."""
import pytest
import torch

from kit import reference
from kit.gmm import default_mixture
from kit.models import AnalyticModel, initial_state, noise_like
from kit.schedules import karras
from trainfree.samplers import SamplerInputError
from trainfree.samplers.dc_solver import (_unipc_coefs, cpr_fit, cpr_ratios, lagrange, sample_dc_solver,
                                          search_ratios)


def test_unit_ratios_change_nothing():
    m = AnalyticModel(default_mixture(), "eps", cls=torch.tensor([0, 1, 2]), cfg=3.0)
    sig = karras(9)
    x = initial_state(noise_like((3, 8)), sig[0], "ve")
    assert torch.equal(sample_dc_solver(m, x.clone(), sig, ratios=[1.0] * 9), sample_dc_solver(m, x.clone(), sig))


def test_unipc_coefficients():
    """Order 2: predictor rho 1/2 (bh2); the corrector solves UniPC's order conditions; bh1 vs bh2 B(h)."""
    rho_p, rho_c, b_h, phi = _unipc_coefs([-1.3], 0.7, 2, "bh2")
    assert rho_p == [0.5] and len(rho_c) == 2 and b_h == pytest.approx(torch.expm1(torch.tensor(-0.7)).item())
    assert _unipc_coefs([], 0.7, 1, "bh1")[1] == [0.5] and _unipc_coefs([], 0.7, 1, "bh1")[2] == -0.7


def test_lagrange_is_exact_for_quadratics():
    times = [0.3, -0.4, -1.1]
    vals = [torch.tensor([2 * t * t - t + 1.0], dtype=torch.float64) for t in times]
    for tau in (0.5, 0.0, 1.2):
        assert lagrange(vals, times, tau).item() == pytest.approx(2 * tau * tau - tau + 1.0, abs=1e-12)


@pytest.mark.parametrize("nfe", [5, 6, 8])
def test_searched_ratios_help_on_held_out_noise(nfe):
    """Ratios searched on 10 samples lower the error of 64 other samples (CFG 3, eps)."""
    gmm = default_mixture()
    search_model = AnalyticModel(gmm, "eps", cls=torch.arange(10) % 3, cfg=3.0)
    test_model = AnalyticModel(gmm, "eps", cls=torch.arange(64) % 3, cfg=3.0)
    sig = karras(nfe)
    ratios = search_ratios(search_model, initial_state(noise_like((10, 8), seed=7), sig[0], "ve"), sig)
    assert ratios[:2] == [1.0, 1.0] and all(0.5 <= r <= 1.5 for r in ratios)
    x = initial_state(noise_like((64, 8), seed=42), sig[0], "ve")
    ref = reference.solve(test_model.exact, x, float(sig[0]), 0.0, h=1e-2)
    plain = float((sample_dc_solver(test_model, x.clone(), sig) - ref).pow(2).mean().sqrt())
    dc = float((sample_dc_solver(test_model, x.clone(), sig, ratios=ratios) - ref).pow(2).mean().sqrt())
    assert dc < 0.7 * plain


def test_search_costs_one_evaluation_per_trial():
    m = AnalyticModel(default_mixture(), "eps", cls=torch.arange(2) % 3, cfg=3.0)
    sig = karras(6)
    search_ratios(m, initial_state(noise_like((2, 8)), sig[0], "ve"), sig, iters=10, substeps=4)
    reference_nfe = 2 * 2 * (4 * 5 + 1)       # batch 2, cfg, 4 substeps x 5 intervals + the final denoise
    trials = 3 * (10 + 2) * 2 * 2             # steps 2-4 searched, golden section: iters + 2 trials, 1 NFE each
    run = 6 * 2 * 2
    assert m.nfe <= reference_nfe + trials + run


def test_cascade_polynomial_regression():
    """CPR's 36 coefficients reproduce a family of ratio curves it can express, and give rho = 1
    on the first two steps (paper §3.4)."""
    true = torch.randn(36, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    free = (-float("inf"), float("inf"))
    searched = {(n, c): cpr_ratios(true, n, c, bounds=free) for n in (5, 6, 8, 10) for c in (3.0, 5.0, 7.5)}
    fitted = cpr_fit(searched)
    for n, c in ((7, 4.0), (9, 6.5), (5, 7.5)):
        got, want = cpr_ratios(fitted, n, c, bounds=free), cpr_ratios(true, n, c, bounds=free)
        assert got[:2] == [1.0, 1.0] and max(abs(a - b) for a, b in zip(got, want)) < 1e-6


def test_cpr_predictions_stay_in_the_search_interval():
    """Far outside the searched grid the cubic runs away (e.g. -3 at 30 steps); the sampler gets
    ratios clamped to the golden-section interval [0.5, 1.5] instead."""
    coefs = torch.zeros(36, dtype=torch.float64)
    coefs[0] = 40.0                                   # x^0 g^2 n^2 term: grows with NFE and CFG
    free = cpr_ratios(coefs, 30, 12.0, bounds=(-float("inf"), float("inf")))
    assert max(free) > 1.5
    clamped = cpr_ratios(coefs, 30, 12.0)
    assert clamped[:2] == [1.0, 1.0] and max(clamped) == 1.5 and min(clamped) >= 0.5
    coefs[0] = -40.0
    assert min(cpr_ratios(coefs, 30, 12.0)[2:]) == 0.5


def test_bad_options():
    m = AnalyticModel(default_mixture(), "eps")
    with pytest.raises(SamplerInputError, match="ratios"):
        sample_dc_solver(m, noise_like((1, 8)), karras(6), ratios=[1.0, 1.0])
    with pytest.raises(SamplerInputError, match="variant"):
        sample_dc_solver(m, noise_like((1, 8)), karras(6), variant="bh3")
    assert m.nfe == 0
