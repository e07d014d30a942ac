"""The accuracy benchmark's statistics: mode assignment and the bootstrap interval of an RMSE ratio."""
import torch

from kit.gmm import default_mixture
from trainfree.bench.stats import best_label, bootstrap_ratio, component


def test_component_recovers_the_generating_component():
    gmm = default_mixture()
    g = torch.Generator().manual_seed(3)
    logp = gmm.weights.log()[None].expand(4000, -1)
    comp = torch.multinomial(logp.exp(), 1, generator=g).squeeze(1)
    x = gmm.means[comp] + gmm.variances[comp].sqrt() * torch.randn(4000, gmm.dim, dtype=torch.float64, generator=g)
    assert float((component(gmm, x) == comp).double().mean()) > 0.995


def test_mode_error_is_a_jump_between_components():
    gmm = default_mixture()
    a, b = gmm.means[0], gmm.means[1]          # the two components of class 0
    x = torch.stack([a + 0.05, b - 0.05, 0.9 * a + 0.1 * b])
    assert component(gmm, x).tolist() == [0, 1, 0]


def test_bootstrap_interval_covers_the_population_ratio():
    # errors of b are exactly twice those of a on a common random draw: the ratio is 0.5 in every resample
    g = torch.Generator().manual_seed(0)
    e = torch.rand(500, generator=g, dtype=torch.float64)
    lo, hi = bootstrap_ratio(e, 2 * e)
    assert abs(lo - 0.5) < 1e-12 and abs(hi - 0.5) < 1e-12
    # a = b u / 2 with u ~ U(0.5, 1.5) independent of b: the population ratio is 0.5 sqrt(E u^2) = 0.5 sqrt(13/12);
    # the 90% interval from one experiment of 800 samples covers it in about 90% of repetitions, and is narrow
    truth = 0.5 * (13 / 12) ** 0.5
    covered, widths = 0, []
    for rep in range(60):
        gen = torch.Generator().manual_seed(100 + rep)
        b = torch.rand(800, generator=gen, dtype=torch.float64)
        a = 0.5 * b * (torch.rand(800, generator=gen, dtype=torch.float64) + 0.5)
        lo, hi = bootstrap_ratio(a, b, draws=400, seed=rep)
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert 47 <= covered <= 59
    assert 0.005 < sum(widths) / len(widths) < 0.05


def test_best_label_picks_the_lowest_rmse():
    errs = {"x": {5: (torch.tensor([1.0, 1.0]), None)}, "y": {5: (torch.tensor([0.1, 2.0]), None)},
            "z": {6: (torch.tensor([0.0]), None)}}
    assert best_label(errs, ["x", "y", "z"], 5) == "x"        # RMSE 1.0 against 1.42
    assert best_label(errs, ["x", "y"], 6) is None
