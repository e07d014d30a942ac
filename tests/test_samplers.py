"""Contract tests every solver in the SAMPLERS registry must pass, on the exact analytic model."""
import pytest
import torch

from kit import reference
from kit.gmm import default_mixture, point_mass
from kit.models import X_UNKNOWN, AnalyticModel, initial_state, noise_like
from kit.schedules import flow_sigma_table, for_kind
from trainfree.samplers import SAMPLERS, SamplerInputError, UnsupportedModelError

NAMES = sorted(SAMPLERS)
PREDICTIONS = ["eps", "v", "flow"]
# options under which each solver's step reduces to a plain consistent step (no momentum, no shift)
PLAIN = {"ts_ddim": {"window": 0}, "ts_dpmpp_2m": {"window": 0}}


def run(name, model, x, sigmas, **opts):
    return SAMPLERS[name](model, x.clone(), sigmas, **opts)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("zero_end", [True, False])
def test_exact_when_the_denoiser_is_constant(name, pred, zero_end):
    """Data at one point: D is constant along the ODE, so every consistent step is exact."""
    model = AnalyticModel(point_mass(), pred)
    sig = for_kind(model.kind, 7, zero_end)
    x = initial_state(noise_like((3, 8)), sig[0], model.kind)
    exact = reference.gaussian_flow(x, model.gmm.means[0], torch.zeros(8, dtype=torch.float64),
                                    float(sig[0]), float(sig[-1]), model.kind)
    out = run(name, model, x, sig, **PLAIN.get(name, {}))
    assert float((out - exact).abs().max()) < 1e-10


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_accurate_on_the_mixture_with_cfg(name, pred):
    """25 steps on a class-conditional mixture at CFG 3 land near the exact ODE solution."""
    model = AnalyticModel(default_mixture(), pred, cls=torch.tensor([0, 1, 2, 1]), cfg=3.0)
    sig = for_kind(model.kind, 25)
    x = initial_state(noise_like((4, 2, 2, 2)), sig[0], model.kind)
    ref = reference.solve(model.exact, x, float(sig[0]), 0.0, h=2e-2)
    out = run(name, model, x, sig, **PLAIN.get(name, {}))
    rmse = float((out - ref).pow(2).mean().sqrt())
    scale = float(ref.pow(2).mean().sqrt())
    assert rmse < 0.05 * scale, rmse


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", ["eps", "flow"])
def test_batch_rows_are_independent(name, pred):
    """Each row of a batch of 4 equals the same row sampled alone."""
    model = AnalyticModel(default_mixture(), pred, cls=torch.tensor([0, 1, 2, 0]), cfg=2.0)
    sig = for_kind(model.kind, 9)
    x = initial_state(noise_like((4, 8), seed=11), sig[0], model.kind)
    batch = run(name, model, x, sig)
    for i in range(4):
        alone = AnalyticModel(default_mixture(), pred, cls=model.cls[i:i + 1], cfg=2.0)
        assert torch.allclose(run(name, alone, x[i:i + 1], sig), batch[i:i + 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", ["eps", "flow"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("zero_end", [True, False])
def test_one_and_two_step_schedules(name, pred, steps, zero_end):
    model = AnalyticModel(default_mixture(), pred, cls=torch.tensor([1, 2]), cfg=2.0)
    sig = for_kind(model.kind, steps if zero_end else steps + 1, zero_end)
    assert len(sig) == steps + 1
    x = initial_state(noise_like((2, 8)), sig[0], model.kind)
    calls = []
    out = run(name, model, x, sig, callback=calls.append)
    assert torch.isfinite(out).all()
    assert model.nfe == 2 * 2 * steps                     # batch 2, cond + uncond, one per step
    assert [c["i"] for c in calls] == list(range(steps))  # ComfyUI's progress callback, every step
    assert model.sigmas_seen[0] == float(sig[0])


@pytest.mark.parametrize("name", NAMES)
def test_reruns_are_bit_identical(name):
    model = AnalyticModel(default_mixture(), "eps", cls=torch.tensor([0, 1]), cfg=4.0)
    sig = for_kind("ve", 8)
    x = initial_state(noise_like((2, 8)), sig[0], "ve")
    assert torch.equal(run(name, model, x, sig), run(name, model, x, sig))


@pytest.mark.parametrize("name", NAMES)
def test_float32_state_stays_float32(name):
    model = AnalyticModel(default_mixture(), "flow", cls=torch.tensor([0]), cfg=2.0)
    sig = for_kind("flow", 6).float()
    x = initial_state(noise_like((1, 8), dtype=torch.float32), sig[0], "flow")
    out = run(name, model, x, sig)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


BAD_SIGMAS = {
    "too short": torch.tensor([1.0], dtype=torch.float64),
    "not decreasing": torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64),
    "repeated": torch.tensor([2.0, 1.0, 1.0, 0.0], dtype=torch.float64),
    "nan": torch.tensor([2.0, float("nan"), 0.0], dtype=torch.float64),
    "negative": torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64),
    "2-D": torch.ones(2, 2, dtype=torch.float64),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(BAD_SIGMAS))
def test_bad_sigmas_are_refused_before_any_model_call(name, case):
    model = AnalyticModel(default_mixture(), "eps")
    with pytest.raises(SamplerInputError, match="sigmas"):
        run(name, model, noise_like((1, 8)), BAD_SIGMAS[case])
    assert model.nfe == 0


@pytest.mark.parametrize("name", NAMES)
def test_nan_latent_unknown_model_and_flow_range_are_refused(name):
    model = AnalyticModel(default_mixture(), "eps")
    x = noise_like((1, 8))
    x[0, 3] = float("nan")
    with pytest.raises(SamplerInputError, match="NaN"):
        run(name, model, x, for_kind("ve", 4))
    model.model_sampling = X_UNKNOWN()
    with pytest.raises(UnsupportedModelError, match="X_UNKNOWN"):
        run(name, model, noise_like((1, 8)), for_kind("ve", 4))
    flow = AnalyticModel(default_mixture(), "flow")
    with pytest.raises(SamplerInputError, match="<= 1"):
        run(name, flow, noise_like((1, 8)), for_kind("ve", 4))
    assert model.nfe == 0 and flow.nfe == 0


@pytest.mark.parametrize("name", NAMES)
def test_explicit_kind_overrides_detection(name):
    """A harness without ComfyUI objects says which family its denoiser is."""
    model = AnalyticModel(default_mixture(), "flow", cls=torch.tensor([1]), cfg=2.0)
    sig = for_kind("flow", 6)
    x = initial_state(noise_like((1, 8)), sig[0], "flow")
    auto = run(name, model, x, sig)
    del model.model_sampling
    assert torch.equal(run(name, model, x, sig, kind="flow", **({"sigma_table": flow_sigma_table()}
                                                               if name.startswith("ts_") else {})), auto)
    with pytest.raises(SamplerInputError, match="kind"):
        run(name, model, x, sig, kind="vp")


# observed order of each solver's defaults as steps double (momentum: paper Theorem 1; PLMS/GHVB
# above order 2 are limited to 2 by the paper's lower-order warm-up; time shift off = DDIM / DPM++;
# DPM-Solver-v3 without statistics = DPM-Solver++(2M); UniPC-2 whose first step is not corrected, as in
# DC-Solver's official SD setting, stays second order)
ORDERS = {"dc_solver": 2, "dpm_solver_v3": 2, "plms": 2, "plms_hb": 1, "ghvb": 2, "dpmpp_2m_hb": 1, "ts_ddim": 1, "ts_dpmpp_2m": 2}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", ["eps", "flow"])
def test_convergence_order_as_steps_double(name, pred):
    import math

    model = AnalyticModel(default_mixture(), pred, cls=torch.tensor([0, 1, 2]), cfg=2.0)
    s0, s1 = (3.0, 0.3) if model.kind == "ve" else (0.8, 0.2)
    x = (1 - s0 if model.kind == "flow" else 1.0) * model.gmm.sample(3, generator=torch.Generator().manual_seed(3))
    x = x + s0 * noise_like((3, 8))
    ref = reference.solve(model.exact, x, s0, s1, h=2e-3)
    errs = [float((run(name, model, x, torch.linspace(s0, s1, n + 1, dtype=torch.float64), **PLAIN.get(name, {}))
                   - ref).pow(2).mean().sqrt()) for n in (32, 64, 128)]
    slope = math.log2(errs[-2] / errs[-1])
    assert ORDERS[name] - 0.2 < slope < ORDERS[name] + 0.35, (errs, slope)
