"""The analytic kit itself: the denoiser, densities and reference ODE solutions are exact."""
import pytest
import torch

from kit import reference
from kit.gmm import GaussianMixture, default_mixture
from kit.models import AnalyticModel, noise_like

KINDS = ["ve", "flow"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", [None, 1])
def test_denoiser_is_tweedie(kind, cls):
    """E[x0|x] = (x + s^2 grad log p(x)) / alpha: denoiser and density agree to 1e-10."""
    gmm = default_mixture()
    sigma = torch.tensor(0.7 if kind == "ve" else 0.4, dtype=torch.float64)
    x = (noise_like((5, 8), seed=2) * 1.5).requires_grad_(True)
    logp = gmm.log_prob(x, sigma, kind, cls).sum()
    (grad,) = torch.autograd.grad(logp, x)
    alpha = 1.0 if kind == "ve" else 1.0 - sigma
    tweedie = (x.detach() + sigma**2 * grad) / alpha
    assert torch.allclose(gmm.denoise(x.detach(), sigma, kind, cls), tweedie, atol=1e-10, rtol=0)


def test_flow_denoiser_is_the_ve_denoiser_after_change_of_variables():
    gmm = default_mixture()
    x = noise_like((4, 8), seed=3)
    for t in (0.05, 0.5, 0.93):
        d_rf = gmm.denoise(x, t, "flow", cls=2)
        d_ve = gmm.denoise(x / (1 - t), t / (1 - t), "ve", cls=2)
        assert torch.allclose(d_rf, d_ve, atol=1e-12, rtol=0)


def test_flow_denoiser_at_pure_noise_is_the_class_mean():
    gmm = default_mixture()
    d = gmm.denoise(noise_like((3, 8)), 1.0, "flow", cls=0)
    w = gmm.weights[gmm.labels == 0]
    mean = (w[:, None] * gmm.means[gmm.labels == 0]).sum(0) / w.sum()
    assert torch.allclose(d, mean.expand(3, -1), atol=1e-12)


def test_cfg_target_and_class_posterior():
    gmm = default_mixture()
    x, s = noise_like((6, 8), seed=4), torch.tensor(1.3, dtype=torch.float64)
    d_u, d_c = gmm.denoise(x, s), gmm.denoise(x, s, cls=1)
    assert torch.equal(gmm.cfg_denoise(x, s, 1, 1.0), d_u + (d_c - d_u))
    assert torch.allclose(gmm.cfg_denoise(x, s, 1, 4.0), d_u + 4.0 * (d_c - d_u), atol=0)
    post = gmm.class_posterior(x, s)
    assert torch.allclose(post.sum(1), torch.ones(6, dtype=torch.float64))
    # Bayes: p(x) = sum_c p(c) p(x|c)
    prior = torch.stack([gmm.weights[gmm.labels == c].sum() for c in range(3)])
    mix = torch.logsumexp(torch.stack([gmm.log_prob(x, s, cls=c) for c in range(3)], 1) + prior.log(), 1)
    assert torch.allclose(mix, gmm.log_prob(x, s), atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("end", [0.0, 0.05])
def test_reference_matches_closed_form_for_a_gaussian(kind, end):
    g = GaussianMixture(torch.full((1, 8), 0.5), torch.linspace(0.02, 0.5, 8)[None], [1.0], [0])
    s0 = 14.6 if kind == "ve" else 1.0
    x = noise_like((3, 8)) * (s0 if kind == "ve" else 1.0)
    got = reference.solve(lambda x, s: g.denoise(x, s, kind), x, s0, end)
    exact = reference.gaussian_flow(x, g.means[0], g.variances[0], s0, end, kind)
    assert float((got - exact).abs().max()) < 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_converged_on_the_mixture(kind):
    """Halving the RK4 step changes the mixture's reference by < 1e-8."""
    m = AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow", cls=torch.tensor([0, 2]), cfg=3.0)
    s0 = 14.6 if kind == "ve" else 1.0
    x = noise_like((2, 8), seed=7) * (s0 if kind == "ve" else 1.0)
    a = reference.solve(m.exact, x, s0, 0.0)
    b = reference.solve(m.exact, x, s0, 0.0, h=2.5e-3)
    assert float((a - b).abs().max()) < 1e-8


def test_network_round_trip_and_nfe_count():
    gmm = default_mixture()
    x, s = noise_like((2, 8)), torch.tensor([0.8, 0.8], dtype=torch.float64)
    for pred in ("eps", "v", "flow"):
        m = AnalyticModel(gmm, pred, cls=torch.tensor([0, 1]), cfg=5.0)
        assert torch.allclose(m(x, s), m.exact(x, s), atol=1e-12)
        assert m.nfe == 4 and type(m.model_sampling).__name__ in ("EPS", "V_PREDICTION", "CONST")
