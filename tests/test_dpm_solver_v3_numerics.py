"""DPM-Solver-v3 with steep statistics: the step's integrals stay accurate and the samples finite."""
import math

import pytest
import torch

from kit.gmm import default_mixture
from kit.models import AnalyticModel, initial_state, noise_like
from kit.schedules import flow_linear, karras
from trainfree.samplers.dpm_solver_v3 import sample_dpm_solver_v3
from trainfree.samplers import SamplerInputError
from trainfree.samplers.dpm_solver_v3_ems import EMS, S_MAX, S_MIN


def _constant(s, b, lam=(-10.0, 10.0), n=41):
    grid = torch.linspace(lam[0], lam[1], n, dtype=torch.float64)
    one = torch.ones(n, 1, dtype=torch.float64)
    return EMS(grid, one, s * one, b * one)


def _check_psi(s, b, cases, rtol):
    ems = _constant(s, b)
    for lam_s, t in cases:
        S_s = ems.at(torch.tensor([lam_s], dtype=torch.float64))[4][0]
        want = b * (1 - math.exp(-s * (t - lam_s))) / s
        got = float(ems.psi(lam_s, S_s, [t])[0, 0])
        assert abs(got - want) <= rtol * abs(want), (s, lam_s, t, got, want)
        if t > lam_s:
            x, w, psi = ems.nodes_with_psi(lam_s, t, S_s)
            ref = b * (1 - torch.exp(-s * (x - lam_s))) / s
            assert torch.allclose(psi[:, 0], ref, rtol=rtol, atol=0)
            assert abs(float(w.sum()) - (t - lam_s)) < 1e-12


def test_psi_is_exact_for_the_slopes_calibration_gives():
    """Psi(t) = int_{lam_s}^t e^{-(S_r - S_s)} b_r dr against its closed form b (1 - e^{-s (t - lam_s)}) / s
    for constant s, b; s in [-5, 0.5] covers every table calibrated on the analytic kit."""
    for s in (-5.0, -0.5, 0.5):
        _check_psi(s, 0.7, ((5.0, 5.3), (5.0, 8.0), (-9.0, -8.2), (2.0, 1.5), (-3.0, 4.0)), 1e-10)


def test_psi_keeps_its_digits_at_the_steepest_accepted_slope():
    """s = S_MIN = -8 on [-10, 10]: S spans 160, so integrals from the grid start reach e^160; Psi is integrated
    relative to S_s, on pieces short enough for the steep exponential, and stays exact."""
    _check_psi(S_MIN, 0.7, ((5.0, 5.3), (5.0, 6.0), (-9.0, -8.2), (2.0, 1.5)), 1e-10)


def test_steep_positive_slopes_are_capped_and_sampling_stays_finite():
    """A badly estimated s = +37 (measured on a random tiny Flux) made the last step multiply by e^{s h}:
    NaN samples. s is capped at S_MAX = 0.5 (the share cut is reported), and the run stays finite and
    bounded (measured: at most 13x DPM-Solver++'s largest value with s = 0.5 at every noise level)."""
    ems = _constant(37.0, 0.0)
    assert float(ems.s.max()) == S_MAX and ems.capped == 1.0 and _constant(-3.0, 0.0).capped == 0.0
    assert float(_constant(-27.0, 0.0).s.min()) == S_MIN and _constant(-27.0, 0.0).capped == 1.0
    m = AnalyticModel(default_mixture(), "flow", cls=torch.arange(16) % 3, cfg=7.5)
    sig = flow_linear(6)
    x = initial_state(noise_like((16, 8), seed=3), sig[0], "flow")
    for order in (1, 2, 3):
        out = sample_dpm_solver_v3(m, x.clone(), sig, ems=ems, order=order)
        assert torch.isfinite(out).all() and float(out.abs().max()) < 1e3


def test_psi_matches_brute_force_on_varying_tables_both_ways():
    """Random piecewise-linear s and b (interpolated between grid nodes, held constant outside the grid):
    psi and nodes_with_psi, forward and backward, against a fine trapezoid sum of e^{S_s - S_r} b_r."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(-6.0, 6.0, 25, dtype=torch.float64)
    s = (torch.randn(25, 3, generator=gen, dtype=torch.float64) * 1.5).clamp(max=0.5)
    b = torch.randn(25, 3, generator=gen, dtype=torch.float64)
    ems = EMS(grid, torch.ones_like(s), s, b)

    def brute(lam_s, t):
        r = torch.linspace(lam_s, t, 200001, dtype=torch.float64)
        _, _, bb, _, S = ems.at(r)
        S_s = ems.at(torch.tensor([lam_s], dtype=torch.float64))[4]
        return torch.trapezoid(torch.exp(S_s - S) * bb, r, dim=0)

    for lam_s, t in ((-5.3, -1.1), (0.2, 6.9), (-7.0, -6.2), (3.3, -2.4)):
        S_s = ems.at(torch.tensor([lam_s], dtype=torch.float64))[4][0]
        want = brute(lam_s, t)
        assert torch.allclose(ems.psi(lam_s, S_s, [t])[0], want, rtol=1e-7, atol=1e-9), (lam_s, t)
        x, w, psi = ems.nodes_with_psi(lam_s, t, S_s)
        assert abs(float(w.sum()) - (t - lam_s)) < 1e-12
        j = len(x) // 2
        assert torch.allclose(psi[j], brute(lam_s, float(x[j])), rtol=1e-7, atol=1e-9), (lam_s, t)


def test_a_non_finite_sample_is_a_clear_error_with_statistics():
    """With statistics that do not fit, the state can overflow; the sampler says so instead of returning NaN
    (a black image). Without statistics it behaves as ComfyUI's samplers (no check)."""
    m = AnalyticModel(default_mixture(), "eps")
    calls = [0]

    def failing(x, sigma, **kw):
        calls[0] += 1
        out = m(x, sigma, **kw)
        return out * float("nan") if calls[0] == 3 else out

    failing.model_sampling = m.model_sampling
    sig = karras(6)
    x = initial_state(noise_like((2, 8)), sig[0], "ve")
    with pytest.raises(SamplerInputError, match="became inf / NaN at step 3 of 6"):
        sample_dpm_solver_v3(failing, x.clone(), sig, ems=EMS.degenerate(shape=(1,)))
    calls[0] = 0
    assert not torch.isfinite(sample_dpm_solver_v3(failing, x.clone(), sig)).all()
