"""Momentum samplers (Wizadwongsa & Suwajanakorn, arXiv 2307.11118): the paper's claims, measured."""
import math
from fractions import Fraction

import pytest
import torch

from kit import reference
from kit.gmm import default_mixture
from kit.models import AnalyticModel, initial_state, noise_like
from kit.schedules import karras
from trainfree.samplers import SamplerInputError
from trainfree.samplers.momentum import (ab_mix, sample_dpmpp_2m_hb, sample_ghvb, sample_plms,
                                         sample_plms_hb, split_order)


@pytest.mark.parametrize("r, k, beta", [(0.5, 1, 0.5), (1.0, 1, 1.0), (1.5, 2, 0.5), (2.0, 2, 1.0),
                                        (3.8, 4, 0.8), (4.0, 4, 1.0), (4.9, 5, 0.9)])
def test_momentum_number_split(r, k, beta):
    got_k, got_beta = split_order(r)
    assert got_k == k and math.isclose(got_beta, beta, abs_tol=1e-12)


def _coefficients(k, b):
    hist = [torch.eye(k, dtype=torch.float64)[i] for i in range(k)]
    return ab_mix(hist, k, b).tolist()


@pytest.mark.parametrize("b", [1.0, 0.8, 0.3])
def test_modified_adams_bashforth_coefficients(b):
    """AB_k^b against the paper's printed rational coefficients (divided by b)."""
    printed = {
        1: [b],
        2: [(2 + b) / 2, -(2 - b) / 2],
        3: [(18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12],
        4: [(46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24],
        5: [(1650 + 251 * b) / 720, -(3420 - 646 * b) / 720, (2880 - 264 * b) / 720,
            -(1380 - 106 * b) / 720, (270 - 19 * b) / 720],
    }
    for k, coefs in printed.items():
        assert _coefficients(k, b) == pytest.approx([c / b for c in coefs], abs=1e-14)
    if b == 1.0:
        assert _coefficients(4, 1.0) == pytest.approx([float(Fraction(c, 24)) for c in (55, -59, 37, -9)])


def _model(kind, cfg=3.0, batch=4):
    return AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow",
                         cls=torch.arange(batch) % 3, cfg=cfg)


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_beta_one_is_plain_plms_and_integer_order_is_plain_ab(kind):
    m = _model(kind)
    sig = karras(10) if kind == "ve" else torch.cat([torch.linspace(1, 1e-3, 10, dtype=torch.float64),
                                                     torch.zeros(1, dtype=torch.float64)])
    x = initial_state(noise_like((4, 8)), sig[0], kind)
    for k in (1, 2, 3, 4):
        plain = sample_plms(m, x.clone(), sig, order=k)
        assert torch.equal(sample_plms_hb(m, x.clone(), sig, order=k, beta=1.0), plain)
        assert torch.equal(sample_ghvb(m, x.clone(), sig, order=float(k)), plain)


def _dpmpp_2m_lower_order_final(model, x, sigmas):
    """DPM-Solver++(2M) written out (ComfyUI's dpmpp_2m + diffusers' lower_order_final)."""
    lam = -sigmas.log()
    old = None
    n = len(sigmas) - 1
    for i in range(n):
        d = model(x, sigmas[i] * torch.ones(x.shape[0], dtype=x.dtype))
        if sigmas[i + 1] == 0:
            return d
        h = lam[i + 1] - lam[i]
        dd = d if (old is None or (n < 15 and i == n - 1)) else d + (d - old) * (h / (lam[i] - lam[i - 1])) / 2
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * dd
        old = d
    return x


@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_hb_at_beta_one_is_dpmpp_2m(steps):
    m = _model("ve")
    sig = karras(steps)
    x = initial_state(noise_like((4, 8)), sig[0], "ve")
    ours = sample_dpmpp_2m_hb(m, x.clone(), sig, beta=1.0)
    assert torch.allclose(ours, _dpmpp_2m_lower_order_final(m, x.clone(), sig), atol=1e-12, rtol=0)


def _orders(sampler, kind, **opts):
    """Observed convergence orders log2(e_n / e_2n) on a uniform sigma grid, n = 16..128."""
    m = _model(kind, cfg=2.0)
    s0, s1 = (3.0, 0.3) if kind == "ve" else (0.8, 0.2)
    x0 = m.gmm.sample(4, cls=None, generator=torch.Generator().manual_seed(3))
    x = (1 - s0 if kind == "flow" else 1.0) * x0 + s0 * noise_like((4, 8))
    ref = reference.solve(m.exact, x, s0, s1, h=2e-3)
    errs = [float((sampler(m, x.clone(), torch.linspace(s0, s1, n + 1, dtype=torch.float64), **opts) - ref)
                  .pow(2).mean().sqrt()) for n in (16, 32, 64, 128)]
    return [math.log2(errs[i] / errs[i + 1]) for i in range(3)]


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_heavy_ball_is_first_order(kind):
    """Paper Theorem 1: HB turns any method first order (PLMS4 and DPM-Solver++(2M) here)."""
    for sampler, opts in ((sample_plms_hb, {"order": 4, "beta": 0.8}), (sample_plms_hb, {"order": 2, "beta": 0.5}),
                          (sample_dpmpp_2m_hb, {"beta": 0.8})):
        assert 0.9 < _orders(sampler, kind, **opts)[-1] < 1.15


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_ghvb_orders(kind):
    """GHVB r = k - 1 + beta: order 1 for r <= 1 and k for r in (1, 2] (paper Theorem 2); with
    the paper's lower-order warm-up (Euler first step) larger k stay above 2 but not at k."""
    assert 0.95 < _orders(sample_ghvb, kind, order=0.5)[-1] < 1.15
    assert 1.8 < _orders(sample_ghvb, kind, order=1.5)[-1] < 2.1
    assert 1.9 < _orders(sample_ghvb, kind, order=2.0)[-1] < 2.1
    assert 1.95 < _orders(sample_ghvb, kind, order=2.5)[-1] < 2.7
    assert 1.95 < _orders(sample_dpmpp_2m_hb, kind, beta=1.0)[-1] < 2.1


def _magnitude_score(samples, gmm):
    """Share of elements further than 3 data standard deviations from the data mean (paper §5.1)."""
    data = gmm.sample(20000, generator=torch.Generator().manual_seed(5))
    z = ((samples - data.mean(0)) / data.std(0)).abs()
    return float((z > 3).double().mean())


@pytest.mark.parametrize("steps", [6, 8, 10])
def test_momentum_mitigates_divergence_at_high_guidance(steps):
    """CFG 15 at few steps: PLMS4 diverges; PLMS4+HB and GHVB stay bounded (paper Figs. 1, 5)."""
    m = _model("ve", cfg=15.0, batch=300)
    sig = karras(steps)
    x = initial_state(noise_like((300, 8), seed=1), sig[0], "ve")
    plms4 = _magnitude_score(sample_plms(m, x.clone(), sig, order=4), m.gmm)
    hb = _magnitude_score(sample_plms_hb(m, x.clone(), sig, order=4, beta=0.8), m.gmm)
    ghvb = _magnitude_score(sample_ghvb(m, x.clone(), sig, order=3.5), m.gmm)
    ghvb_low = _magnitude_score(sample_ghvb(m, x.clone(), sig, order=1.5), m.gmm)
    assert plms4 > 0.15
    assert hb < plms4 / 5 and ghvb < plms4 / 4 and ghvb_low < 0.01


def test_stability_region_grows_as_beta_shrinks():
    """Linear test ODE dx/dt = -kappa x with GHVB 3+beta: the largest stable step h*kappa grows
    as beta falls (paper Figs. 4, 6: boundary loci)."""
    hk = torch.arange(1, 800, dtype=torch.float64) / 200

    def boundary(beta):
        x, v, hist = torch.ones_like(hk), None, []
        for _ in range(400):
            e = -x * hk
            v = e if v is None else (1 - beta) * v + beta * e
            hist = [v] + hist[:3]
            x = x + ab_mix(hist, 4, beta)
        stable = torch.nan_to_num(x.abs(), nan=math.inf) < 1e3
        return float(hk[stable].max())

    b1, b08, b05 = boundary(1.0), boundary(0.8), boundary(0.5)
    assert b1 < b08 < b05


@pytest.mark.parametrize("bad", [{"order": 0}, {"order": 6}, {"beta": 0.0}, {"beta": 1.5}, {"beta": float("nan")},
                                 {"order": 2.5, "beta": 0.9}])
def test_options_out_of_range(bad):
    m = _model("ve")
    sampler = sample_ghvb if set(bad) == {"order"} else sample_plms_hb
    with pytest.raises(SamplerInputError):
        sampler(m, noise_like((4, 8)), karras(4), **bad)
    assert m.nfe == 0
