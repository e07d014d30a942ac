"""Time-shift sampler (Li et al., ICLR 2024): the shift rule, its statistic and its reductions."""
import pytest
import torch

from kit.gmm import GaussianMixture, default_mixture
from kit.models import AnalyticModel, initial_state, noise_like
from kit.schedules import flow_linear, karras, sd_sigma_table
from trainfree.samplers import SamplerInputError
from trainfree.samplers.momentum import sample_plms
from trainfree.samplers.time_shift import Shifter, sample_ts_ddim, sample_ts_dpmpp_2m

DIM = 16384   # a 64x64x4 latent: the per-sample variance is then known to ~1%


def iso_mixture(v_mean=0.36, var=0.1, k=4):
    """High-dimensional mixture whose samples all have element variance ~ v_mean + var."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(k, DIM, dtype=torch.float64, generator=g)
    mu = (mu - mu.mean(1, keepdim=True)) / mu.std(1, keepdim=True) * v_mean**0.5
    return GaussianMixture(mu, torch.full((k, DIM), var, dtype=torch.float64), torch.full((k,), 1 / k), torch.arange(k))


def _plain_ddim(model, x, sigmas, kind):
    return sample_plms(model, x, sigmas, order=1, kind=kind)


@pytest.mark.parametrize("pred", ["eps", "flow"])
def test_no_window_or_high_cutoff_is_the_plain_sampler(pred):
    m = AnalyticModel(default_mixture(), pred, cls=torch.tensor([0, 1, 2]), cfg=3.0)
    sig = karras(8) if m.kind == "ve" else flow_linear(8)
    x = initial_state(noise_like((3, 8)), sig[0], m.kind)
    ddim = sample_ts_ddim(m, x.clone(), sig, window=0)
    assert torch.allclose(ddim, _plain_ddim(m, x.clone(), sig, m.kind), atol=1e-12, rtol=0)
    assert torch.equal(sample_ts_ddim(m, x.clone(), sig, window=80, cutoff=1000), ddim)
    dpm = sample_ts_dpmpp_2m(m, x.clone(), sig, window=0)
    assert torch.equal(sample_ts_dpmpp_2m(m, x.clone(), sig, window=30, cutoff=1000), dpm)


def test_statistic_is_unbiased_with_the_data_variance_and_biased_without():
    """On exact forward-process samples the calibrated statistic keeps t; the official one
    (v0 = 0) picks noisier steps, as E[Var x_vp] = abar v0 + 1 - abar predicts."""
    gmm = iso_mixture()
    model = AnalyticModel(gmm, "eps")
    x0 = gmm.sample(16, generator=torch.Generator().manual_seed(1))
    v0 = float(x0.var(dim=1).mean())
    calibrated = Shifter(model, "ve", window=200, cutoff=0, data_variance=v0)
    official = Shifter(model, "ve", window=200, cutoff=0, data_variance=0.0)
    table = sd_sigma_table()
    for t in (300, 500, 700):
        sigma = float(table[t])
        x = x0 + sigma * noise_like((16, DIM), seed=t)
        idx_cal = torch.tensor([calibrated.index(float(s)) for s in calibrated.choose(x, sigma)], dtype=torch.float64)
        idx_off = torch.tensor([official.index(float(s)) for s in official.choose(x, sigma)], dtype=torch.float64)
        assert abs(float(idx_cal.mean()) - t) < 6 and float((idx_cal - t).abs().max()) < 60   # unbiased; ~1% noise
        assert float(idx_off.mean()) > t + 40


def test_shift_follows_the_excess_noise_per_sample():
    """Rows carrying more noise than their nominal level get a noisier network time, rows with
    less get a cleaner one, each row on its own."""
    gmm = iso_mixture()
    model = AnalyticModel(gmm, "eps")
    x0 = gmm.sample(3, generator=torch.Generator().manual_seed(2))
    v0 = float(x0.var(dim=1).mean())
    sh = Shifter(model, "ve", window=300, cutoff=0, data_variance=v0)
    table = sd_sigma_table()
    sigma = float(table[500])
    levels = torch.tensor([table[420], table[500], table[580]], dtype=torch.float64)
    # states the network sees as forward-process samples at levels 420 / 500 / 580
    x = (x0 + levels[:, None] * noise_like((3, DIM), seed=3)) * ((1 + sigma**2) / (1 + levels[:, None] ** 2)) ** 0.5
    idx = [sh.index(float(s)) for s in sh.choose(x, sigma)]
    assert abs(idx[0] - 420) < 30 and abs(idx[1] - 500) < 30 and abs(idx[2] - 580) < 30


@pytest.mark.parametrize("pred", ["eps", "flow"])
def test_network_sees_the_same_input_at_the_shifted_time(pred):
    gmm = iso_mixture()
    m = AnalyticModel(gmm, pred)
    calls = []

    def recording(x, sigma, **kw):
        calls.append((x.clone(), sigma.clone()))
        return m(x, sigma, **kw)

    recording.model_sampling = m.model_sampling
    sig = karras(6) if m.kind == "ve" else flow_linear(6)
    x = initial_state(noise_like((2, DIM)), sig[0], m.kind) * 1.05   # an off-marginal state
    sample_ts_ddim(recording, x, sig, window=200, cutoff=0, data_variance=0.46)
    shifted = [(xi, si, sig[i]) for i, (xi, si) in enumerate(calls) if not torch.equal(si, sig[i].expand(2))]
    assert shifted, "expected at least one shifted evaluation"
    assert all(float(si.min()) > 0 for _, si, _ in shifted)


@pytest.mark.parametrize("sampler", [sample_ts_ddim, sample_ts_dpmpp_2m])
def test_each_call_names_its_schedule_step_for_caches(sampler):
    """The shifted calls happen at another sigma than the schedule's; caches and step-keyed patches (DeepCache,
    the DiT cache, LinearAG) would count them for the previous step, so every call carries STEP_SIGMA."""
    from trainfree.samplers.common import STEP_SIGMA

    m = AnalyticModel(iso_mixture(), "eps")
    named = []

    def recording(x, sigma, model_options=None, **kw):
        named.append((float(sigma[0]), model_options["transformer_options"][STEP_SIGMA]))
        assert "keep" in model_options["transformer_options"]
        return m(x, sigma, **kw)

    recording.model_sampling = m.model_sampling
    sig = karras(6)
    x = initial_state(noise_like((2, DIM)), sig[0], "ve") * 1.05
    options = {"transformer_options": {"keep": 1}}
    sampler(recording, x, sig, extra_args={"model_options": options}, window=200, cutoff=0, data_variance=0.46)
    assert [s for _, s in named] == [float(v) for v in sig[:-1]]
    assert any(called != s for called, s in named)                       # shifted calls were made
    assert options == {"transformer_options": {"keep": 1}}               # the caller's options are not modified


def test_cutoff_keeps_late_steps_nominal():
    gmm = iso_mixture()
    m = AnalyticModel(gmm, "eps")
    table = sd_sigma_table()
    sig = torch.cat([table[torch.linspace(999, 0, 10).round().long()], torch.zeros(1, dtype=torch.float64)])
    x = initial_state(noise_like((2, DIM)), sig[0], "ve") * 1.1
    sample_ts_ddim(m, x, sig, window=80, cutoff=500)
    nominal = set(float(s) for s in sig)
    late = [s for s in m.sigmas_seen if s <= float(table[500])]
    assert late and all(s in nominal for s in late)
    assert any(s not in nominal for s in m.sigmas_seen)


@pytest.mark.parametrize("bad", [{"window": -1}, {"window": 2000}, {"cutoff": 1001}, {"data_variance": -0.1}])
def test_options_out_of_range(bad):
    m = AnalyticModel(default_mixture(), "eps")
    with pytest.raises(SamplerInputError):
        sample_ts_ddim(m, noise_like((1, 8)), karras(4), **bad)
    assert m.nfe == 0


def test_missing_sigma_table_is_a_clear_error():
    m = AnalyticModel(default_mixture(), "eps")
    del m.model_sampling
    with pytest.raises(SamplerInputError, match="sigma table"):
        sample_ts_dpmpp_2m(m, noise_like((1, 8)), karras(4), kind="ve")
