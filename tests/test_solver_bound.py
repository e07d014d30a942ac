"""bench.solver_bound: the jointly fitted integrator starts as Euler/DDIM on the given schedule and
its fit lowers the error on noises it was not fitted on."""
import pytest
import torch

from kit.gmm import default_mixture
from kit.models import AnalyticModel, initial_state, noise_like
from kit.schedules import for_kind
from trainfree.bench.solver_bound import LearnedIntegrator, fit


def _euler(denoise, x, sigmas):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoise(x, sigmas[i])) / sigmas[i]
    return x


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_starts_as_euler_on_the_given_schedule(kind):
    sigmas = for_kind(kind, 6)
    model = AnalyticModel(default_mixture(), "eps" if kind == "ve" else "flow", cls=torch.arange(32) % 3, cfg=3.0)
    x = initial_state(noise_like((32, 8), seed=1), float(sigmas[0]), kind)
    solver = LearnedIntegrator(sigmas, kind)
    assert torch.allclose(solver.sigmas().detach(), sigmas, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        out = solver(model.exact, x)
    assert torch.allclose(out, _euler(model.exact, x, sigmas), rtol=1e-10, atol=1e-10)


def test_fit_lowers_the_held_out_error():
    logged = []
    solver, err, _ = fit("flow", 3.0, 4, train=128, iters=40, heldout=256, validation=128,
                          log=logged.append)
    start = float(logged[0].split("DDIM start ")[1].split()[0])
    assert err < 0.8 * start
    sig = solver.sigmas().detach()
    assert bool((sig[1:] < sig[:-1]).all()) and sig[0] == 1.0 and sig[-1] == 0.0


def test_dc_joint_search_keeps_its_budget_and_lowers_the_training_error():
    """fit_dc: DC-Solver's ratios and the sigmas searched end to end, within the run budget and the ratio bounds."""
    from trainfree.bench.solver_bound import fit_dc
    from trainfree.samplers.dc_solver import sample_dc_solver

    logged = []
    sigmas, ratios, err, (model, x, ref) = fit_dc("ve", 3.0, 5, train=64, budget=40, heldout=128, bounds=(0.5, 1.5),
                                                  log=logged.append)
    runs, rest = logged[0].split(": ")[1].split(" runs, training RMSE ")
    start, best = (float(v) for v in rest.split(",")[0].split(" -> "))
    assert int(runs) == 40 and best < 0.9 * start
    assert len(ratios) == 5 and ratios[:2] == [1.0, 1.0] and ratios[-1] == 1.0
    assert all(0.5 <= r <= 1.5 for r in ratios)
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[-1] == 0.0
    out = sample_dc_solver(model.exact, x.clone(), sigmas, ratios=ratios, kind="ve")   # err is that run's error
    assert abs(float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) - err) < 1e-12


@pytest.mark.parametrize("order", [1, 2, 3])
def test_adams_weights_integrate_polynomials_of_lower_degree_exactly(order):
    """The exponential Adams rule of order k reproduces sum_j w_ij D_j = int e^(l - l1) D(l) dl / (1 - e^-h) when D
    is a polynomial in lambda of degree < k (checked against a fine trapezoid sum); weights sum to 1; order 1 is
    DDIM; a start at lambda = -inf (flow) is left out of the stencil."""
    from trainfree.bench.solver_bound import adams_weights

    lam = torch.tensor([-2.0, -1.3, -0.5, 0.4], dtype=torch.float64)
    w = adams_weights(lam, 2, order)
    assert abs(float(w.sum()) - 1.0) < 1e-12
    grid = torch.linspace(float(lam[2]), float(lam[3]), 200001, dtype=torch.float64)
    for degree in range(order):
        want = torch.trapz(torch.exp(grid - lam[3]) * grid ** degree, grid) / -torch.expm1(lam[2] - lam[3])
        assert abs(float((w * lam[:3] ** degree).sum() - want)) < 1e-8
    if order < 3:        # and not a polynomial of its own degree (else the test could not fail)
        want = torch.trapz(torch.exp(grid - lam[3]) * grid ** order, grid) / -torch.expm1(lam[2] - lam[3])
        assert abs(float((w * lam[:3] ** order).sum() - want)) > 1e-3
    flow = torch.tensor([-float("inf"), -1.3, -0.5, 0.4], dtype=torch.float64)
    assert adams_weights(flow, 0, order).tolist() == [1.0]
    assert torch.equal(adams_weights(flow, 2, order)[0], torch.zeros((), dtype=torch.float64))
