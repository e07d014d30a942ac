"""DPM-Solver-v3 (Zheng et al., NeurIPS 2023): reductions, exactness with analytic statistics,
the statistics estimator, and the gain from estimated statistics on the analytic kit."""
import math

import pytest
import torch

from kit import reference
from kit.gmm import GaussianMixture, default_mixture
from kit.models import AnalyticModel, initial_state, noise_like
from kit.schedules import flow_linear, karras
from trainfree.samplers import SamplerInputError
from trainfree.samplers.dpm_solver_v3 import sample_dpm_solver_v3
from trainfree.samplers.dpm_solver_v3_ems import EMS, estimate, lambda_range
from trainfree.samplers.momentum import sample_dpmpp_2m_hb, sample_plms


def _lam(sig, kind):
    a, s = (torch.ones_like(sig), sig) if kind == "ve" else (1 - sig, sig)
    return torch.log(a) - torch.log(s), a, s


def _dpmpp_2m_taylor(model, x, sigmas, kind):
    """DPM-Solver++(2M), Taylor form, lower-order final step, written out in (alpha, s, lambda)."""
    lam, a, s = _lam(sigmas, kind)
    old, n = None, len(sigmas) - 1
    for i in range(n):
        d = model(x, sigmas[i] * torch.ones(x.shape[0], dtype=x.dtype))
        h = lam[i + 1] - lam[i]
        x = (s[i + 1] / s[i]) * x - a[i + 1] * torch.expm1(-h) * d
        if old is not None and i < n - 1:
            x = x + a[i + 1] * (torch.expm1(-h) / h + 1) * (d - old) / ((lam[i] - lam[i - 1]) / h)
        old = d
    return x


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_degenerate_statistics_are_ddim_and_dpm_solver_pp(kind):
    m = AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow", cls=torch.tensor([0, 1, 2]), cfg=3.0)
    sig = karras(8, zero_end=False) if kind == "ve" else flow_linear(8, t_max=0.97, zero_end=False)
    x = initial_state(noise_like((3, 8)), sig[0], kind)
    v3_1 = sample_dpm_solver_v3(m, x.clone(), sig, order=1, corrector=False)
    assert torch.allclose(v3_1, sample_plms(m, x.clone(), sig, order=1), atol=1e-12, rtol=0)
    v3_2 = sample_dpm_solver_v3(m, x.clone(), sig, order=2, corrector=False)
    assert torch.allclose(v3_2, _dpmpp_2m_taylor(m, x.clone(), sig, kind), atol=1e-12, rtol=0)


def _gaussian_ems(mu, c, lam):
    """Exact EMS of N(mu, diag c): l = sigma^2/(c + sigma^2), f = -mu l does not depend on x,
    so s = 0 and b = f' (and g is constant: the first-order step is exact)."""
    s2 = torch.exp(-2 * lam)[:, None]
    l = s2 / (c + s2)
    return EMS(lam, l, torch.zeros_like(l), 2 * mu * c * s2 / (c + s2) ** 2)


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("steps", [2, 3, 5, 10])
def test_first_order_step_is_exact_with_the_exact_statistics(kind, steps):
    mu, c = torch.linspace(-1, 1, 8, dtype=torch.float64), torch.linspace(0.05, 0.5, 8, dtype=torch.float64)
    m = AnalyticModel(GaussianMixture(mu[None], c[None], [1.0], [0]), "eps" if kind == "ve" else "flow")
    ems = _gaussian_ems(mu, c, torch.linspace(-8, 8, 3201, dtype=torch.float64))
    sig = karras(steps, sigma_min=0.03, zero_end=False) if kind == "ve" else flow_linear(steps, 0.99, 0.03, False)
    x = initial_state(noise_like((3, 8)), sig[0], kind)
    exact = reference.gaussian_flow(x, mu, c, float(sig[0]), float(sig[-1]), kind)
    v3 = sample_dpm_solver_v3(m, x.clone(), sig, ems=ems, order=1, corrector=False)
    ddim = sample_plms(m, x.clone(), sig, order=1)
    assert float((v3 - exact).abs().max()) < 1e-5 < 0.05 < float((ddim - exact).abs().max())


def test_estimated_l_matches_the_exact_jacobian_diagonal():
    """l = 1 - E[diag dD/dx]: the finite-difference Rademacher estimator against autograd."""
    gmm = default_mixture()
    model = AnalyticModel(gmm, "eps")
    x0 = [gmm.sample(4096, generator=torch.Generator().manual_seed(1))]
    lam = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    ems = estimate(model, x0, lam, "ve", window=1, seed=3)
    g = torch.Generator().manual_seed(9)
    for i, lv in enumerate(lam.tolist()):
        sigma = math.exp(-lv)
        x = gmm.sample(4096, generator=g) + sigma * torch.randn(4096, 8, dtype=torch.float64, generator=g)
        x.requires_grad_(True)
        diag = torch.stack([torch.autograd.grad(gmm.denoise(x, sigma)[:, j].sum(), x, retain_graph=True)[0][:, j]
                            for j in range(8)], 1)
        exact = 1 - diag.mean(0)
        spread = diag.std(0) / 4096**0.5 * 4 + 0.03     # 4 standard errors + Rademacher noise
        assert ((ems.l[i] - exact).abs() < spread).all()


def _calibrated(kind, cfg):
    gmm = default_mixture()
    pred = "eps" if kind == "ve" else "flow"
    cal = AnalyticModel(gmm, pred, cls=torch.arange(256) % 3, cfg=cfg)
    sched = karras(60) if kind == "ve" else flow_linear(60)
    x0 = [sample_dpmpp_2m_hb(cal, initial_state(noise_like((256, 8), seed=100 + i), sched[0], kind), sched, beta=1.0)
          for i in range(4)]                                          # the guided model's own samples
    lo, hi = lambda_range(14.61, 0.0292, kind) if kind == "ve" else lambda_range(1.0, 1e-3, kind)
    return estimate(cal, x0, torch.linspace(lo - 0.1, hi + 0.1, 120, dtype=torch.float64), kind)


@pytest.mark.parametrize("kind, cfg, nfes, ratio", [("ve", 3.0, (5, 6, 8, 10), 0.5), ("flow", 1.0, (8, 10, 15), 0.5)])
def test_estimated_statistics_beat_dpm_solver_pp_at_low_nfe(kind, cfg, nfes, ratio):
    ems = _calibrated(kind, cfg)
    m = AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow", cls=torch.arange(64) % 3, cfg=cfg)
    sig0 = karras(4) if kind == "ve" else flow_linear(4)
    x = initial_state(noise_like((64, 8), seed=42), sig0[0], kind)
    ref = reference.solve(m.exact, x, float(sig0[0]), 0.0, h=1e-2)
    for n in nfes:
        sig = karras(n) if kind == "ve" else flow_linear(n)
        err_v3 = float((sample_dpm_solver_v3(m, x.clone(), sig, ems=ems) - ref).pow(2).mean().sqrt())
        err_pp = float((sample_dpmpp_2m_hb(m, x.clone(), sig, beta=1.0) - ref).pow(2).mean().sqrt())
        assert err_v3 < ratio * err_pp, (n, err_v3, err_pp)


def test_statistics_that_do_not_fit_the_latent_are_refused():
    m = AnalyticModel(default_mixture(), "eps")
    ems = EMS.degenerate(shape=(3,))
    with pytest.raises(SamplerInputError, match="do not fit"):
        sample_dpm_solver_v3(m, noise_like((1, 8)), karras(4), ems=ems)
    with pytest.raises(SamplerInputError, match="order"):
        sample_dpm_solver_v3(m, noise_like((1, 8)), karras(4), order=4)
    assert m.nfe == 0


def test_calibrated_beats_uncalibrated_at_high_guidance():
    """CFG 7.5: the same solver with its statistics beats itself without them at every NFE (the R^2
    shrinkage of s is what makes this hold beyond 10 NFE)."""
    ems = _calibrated("ve", 7.5)
    m = AnalyticModel(default_mixture(), "eps", cls=torch.arange(64) % 3, cfg=7.5)
    x = initial_state(noise_like((64, 8), seed=42), karras(4)[0], "ve")
    ref = reference.solve(m.exact, x, float(karras(4)[0]), 0.0, h=1e-2)
    for n in (5, 6, 8, 10, 15, 20):
        sig = karras(n)
        with_ems = float((sample_dpm_solver_v3(m, x.clone(), sig, ems=ems) - ref).pow(2).mean().sqrt())
        without = float((sample_dpm_solver_v3(m, x.clone(), sig) - ref).pow(2).mean().sqrt())
        assert with_ems < 0.8 * without, (n, with_ems, without)
