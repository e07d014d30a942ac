"""Adaptive Guidance (Castillo et al., AAAI 2025) on the analytic kit: evaluations saved, fidelity kept."""
import pytest
import torch

from kit.gmm import default_mixture
from kit.models import initial_state, noise_like
from kit.schedules import karras
from trainfree.guidance.adaptive_guidance import AdaptiveGuidance, agreement
from trainfree.samplers import SAMPLERS


class GuidedMixture:
    """CFG on the exact mixture with AG deciding, like a sampler sees it; counts network evaluations."""

    def __init__(self, gmm, cls, scale, threshold=None):
        self.gmm, self.cls, self.scale, self.threshold = gmm, cls, scale, threshold
        self.ag = None if threshold is None else AdaptiveGuidance(threshold, len(cls))
        self.nfe = 0

    def __call__(self, x, sigma, **kw):
        d_c = self.gmm.denoise(x, sigma, "ve", self.cls)
        self.nfe += x.shape[0]
        if self.ag is None:
            self.nfe += x.shape[0]
            d_u = self.gmm.denoise(x, sigma, "ve")
            return d_u + self.scale * (d_c - d_u)
        rows = self.ag.guided.nonzero().flatten()
        d_u = d_c.clone()
        if rows.numel():
            d_u[rows] = self.gmm.denoise(x[rows], sigma.reshape(-1)[rows] if sigma.numel() > 1 else sigma, "ve")
        self.nfe += rows.numel()
        self.ag.count(rows.numel(), x.shape[0])
        return self.ag.combine(x, d_c, d_u, self.scale)


def _run(threshold, steps=20, batch=256, scale=5.0, sampler="dpmpp_2m_hb"):
    gmm = default_mixture()
    cls = torch.arange(batch) % 3
    model = GuidedMixture(gmm, cls, scale, threshold)
    sig = karras(steps)
    x = initial_state(noise_like((batch, 8), seed=9), sig[0], "ve")
    opts = {"beta": 1.0} if sampler == "dpmpp_2m_hb" else {}
    return SAMPLERS[sampler](model, x, sig, **opts, kind="ve"), model, gmm, cls


def test_threshold_one_is_plain_cfg_bit_for_bit():
    cfg, m_cfg, _, _ = _run(None)
    ag, m_ag, _, _ = _run(1.0)
    assert torch.equal(ag, cfg) and m_ag.nfe == m_cfg.nfe and m_ag.ag.saved == 0


def test_saves_a_third_of_the_evaluations_within_two_percent():
    """The issue's target: >= 30% of CFG's evaluations saved, samples within 2% relative RMSE of
    CFG's, class accuracy unchanged. On this mixture the agreement is already 1 - 1e-3 at the highest
    noise (the noise term dominates both estimates), so the useful thresholds sit at 1 - 1e-4 and above
    (measured: 1 - 1e-2 saves 46% but moves samples by 33%; 1 - 1e-4 saves 31% within 0.3%)."""
    cfg, m_cfg, gmm, cls = _run(None)
    ag, m_ag, _, _ = _run(1 - 1e-4)
    saved = 1 - m_ag.nfe / m_cfg.nfe
    rel = float((ag - cfg).pow(2).mean().sqrt() / cfg.pow(2).mean().sqrt())
    acc = lambda x: float((gmm.class_posterior(x, torch.tensor(0.02, dtype=torch.float64)).argmax(1) == cls).double().mean())
    assert saved >= 0.30 and rel < 0.02 and acc(ag) == acc(cfg)
    assert m_ag.ag.saved == m_cfg.nfe - m_ag.nfe          # the counter reports what was skipped


def test_agreement_rises_as_noise_falls_and_rows_switch_off_on_their_own():
    """On forward samples of the conditioning class, gamma rises towards 1 as noise falls (the
    paper's premise; on this mixture it starts near 1 already); each row decides for itself."""
    gmm = default_mixture()
    cls = torch.arange(64) % 3
    x0 = torch.cat([gmm.sample(1, cls=int(c), generator=torch.Generator().manual_seed(i)) for i, c in enumerate(cls)])
    gammas = []
    for sigma in (10.0, 2.0, 0.3):
        x = x0 + sigma * noise_like((64, 8), seed=3)
        s = torch.tensor(sigma, dtype=torch.float64)
        gammas.append(float(agreement(x, gmm.denoise(x, s, "ve", cls), gmm.denoise(x, s, "ve")).median()))
    assert 0.99 < gammas[0] < gammas[1] <= gammas[2] <= 1.0
    _, m, _, _ = _run(0.999, batch=6)
    alone = [_run(0.999, batch=6)[0][i] for i in range(6)]
    assert not m.ag.guided.all()
    assert all(torch.allclose(a, b) for a, b in zip(alone, _run(0.999, batch=6)[0]))


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_bad_threshold(bad):
    with pytest.raises(ValueError):
        AdaptiveGuidance(bad, 2)
