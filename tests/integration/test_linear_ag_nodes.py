"""LinearAG in ComfyUI: calibrate on a tiny model, save/reload, sample with the patch, refusals, composition."""
import logging

import pytest
import torch

from probes import count_rows


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _node(comfyui, name):
    return comfyui.nodes.NODE_CLASS_MAPPINGS[name]()


def _calibrate(comfyui, model, steps=8, history=1, name="lag_test", overwrite=True, batch=4):
    tiny = _tiny(comfyui)
    return _node(comfyui, "TrainFreeLinearAGCalibrate").calibrate(
        model, tiny.conditioning("sd15", 1, batch), tiny.conditioning("sd15", 2), {"samples": torch.zeros(batch, 4, 8, 8)},
        steps, 4.0, "euler", "normal", history, 0, name, overwrite)[0]


def _patch(comfyui, model, record, start=0.0, end=1.0, unique_id=None):
    return _node(comfyui, "TrainFreeLinearAG").patch(model, record, start, end, unique_id)[0]


def _sample(comfyui, model, steps=8, cfg=4.0, batch=2, sampler="euler"):
    import comfy.sample

    tiny = _tiny(comfyui)
    latent = torch.zeros(batch, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", tiny.conditioning("sd15", 3, batch),
                               tiny.conditioning("sd15", 4, batch), latent, seed=4, disable_pbar=True)


def test_calibrate_save_reload_and_sample(comfyui, models_dir, caplog, monkeypatch):
    import server

    sent = []

    class FakeServer:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", FakeServer(), raising=False)
    tiny = _tiny(comfyui)
    base = tiny.build("sd15")
    rec = _calibrate(comfyui, base)
    assert (models_dir / "linear_ag" / "lag_test.safetensors").is_file()
    assert rec.coef.shape == (8, 3) and torch.isnan(rec.coef[0]).all() and rec.coef[1:].isfinite().all()
    assert float(rec.r2[1:].min()) > 0.999         # measured 0.9992 at step 1 rising to 1 - 2e-8
    again = _calibrate(comfyui, base, overwrite=False)                  # reused, not recomputed
    torch.testing.assert_close(again.coef, rec.coef, rtol=0, atol=0, equal_nan=True)
    loaded = _node(comfyui, "TrainFreeLinearAGLoad").load("lag_test.safetensors")[0]
    torch.testing.assert_close(loaded.coef, rec.coef, rtol=0, atol=0, equal_nan=True)
    assert loaded.keys == rec.keys and loaded.keys["steps"] == "8"
    model, rows = count_rows(_patch(comfyui, base, loaded, unique_id="5"))
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out = _sample(comfyui, model)
    assert rows == [4, 2] * 4                      # steps 1, 3, 5, 7 (every other): conditional rows only
    assert "LinearAG replaced 8 of 16 unconditional evaluations" in caplog.text
    assert sent == [("5", "LinearAG: 8 of 16 negative-prompt evaluations replaced (50%)")]
    plain = _sample(comfyui, base)
    rel = float((out - plain).pow(2).mean().sqrt() / plain.pow(2).mean().sqrt())
    assert 0 < rel < 0.02, rel                     # measured 0.57%: close to CFG, not identical
    assert torch.equal(_sample(comfyui, _patch(comfyui, base, loaded, 0.0, 0.0)), plain)   # empty window: CFG


def test_first_half_and_history_two(comfyui, models_dir):
    base = _tiny(comfyui).build("sd15")
    rec = _calibrate(comfyui, base, steps=10, history=2, name="lag_h2")
    model, rows = count_rows(_patch(comfyui, base, rec, 0.0, 0.5))
    _sample(comfyui, model, steps=10)
    assert rows == [4, 4, 4, 2, 4] + [4] * 5       # history 2, first half: only step 3 (odd, >= 2, < 5)


def test_refuses_other_model_and_other_steps(comfyui, models_dir):
    tiny = _tiny(comfyui)
    base = tiny.build("sd15")
    rec = _calibrate(comfyui, base)
    with pytest.raises(ValueError, match="belong to another model .*model: calibrated for"):
        _patch(comfyui, tiny.build("sd15", seed=3), rec)
    with pytest.raises(ValueError, match="calibrated for 8 steps of the 'normal' scheduler .* this run samples 6 steps"):
        _sample(comfyui, _patch(comfyui, base, rec), steps=6)
    with pytest.raises(ValueError, match="another model"):
        _patch(comfyui, tiny.build("flux"), rec)


def test_cfg_one_and_composition_with_adaptive_guidance_and_pag(comfyui, models_dir):
    import comfy_extras.nodes_pag as pag

    base = _tiny(comfyui).build("sd15")
    rec = _calibrate(comfyui, base)
    lin = _patch(comfyui, base, rec)
    assert torch.equal(_sample(comfyui, lin, cfg=1.0), _sample(comfyui, base, cfg=1.0))
    ag = _node(comfyui, "TrainFreeAdaptiveGuidance").patch(lin, 0.0)[0]   # AG switches off after step 1
    both, rows = count_rows(pag.PerturbedAttentionGuidance.execute(ag, 2.0)[0])
    out = _sample(comfyui, both)
    assert torch.isfinite(out).all()
    model, rows = count_rows(_node(comfyui, "TrainFreeAdaptiveGuidance").patch(lin, 0.0)[0])
    _sample(comfyui, model)
    assert rows == [4] + [2] * 7                    # AG takes over from step 2: conditional rows only


def test_two_guidance_patches_and_a_cache_with_an_empty_negative(comfyui, models_dir):
    """LinearAG + Adaptive Guidance + DeepCache on one model, batch 2 with different prompts, and a zeroed
    (empty) negative prompt: runs, and the guidance patches still save what they should."""
    import comfy.sample

    if "TrainFreeDeepCache" not in comfyui.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("DeepCache node not in this build")
    tiny = _tiny(comfyui)
    base = tiny.build("sd15")
    lin = _patch(comfyui, base, _calibrate(comfyui, base))
    pos = tiny.conditioning("sd15", 3, 2)
    empty = [[torch.zeros_like(pos[0][0][:1]), {}]]
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    # AG at 0: it takes over after step 1; at 0.999999 it stays on here and LinearAG does the saving
    for threshold, want in ((0.0, [4] + [2] * 7), (0.999999, [4, 2] * 4)):
        ag = _node(comfyui, "TrainFreeAdaptiveGuidance").patch(lin, threshold)[0]
        model, rows = count_rows(_node(comfyui, "TrainFreeDeepCache").patch(ag, 3, 1, "uniform", 0.0, 1.0)[0])
        out = comfy.sample.sample(model, noise, 8, 4.0, "euler", "normal", pos, empty, torch.zeros_like(noise),
                                  seed=4, disable_pbar=True)
        assert torch.isfinite(out).all() and rows == want


def test_samplers_that_drop_the_penultimate_sigma_and_two_calls_per_step(comfyui, models_dir):
    """uni_pc samples KSampler's steps + 1 schedule minus its penultimate sigma; heun calls the model twice per
    step: LinearAG acts at the first call at each schedule sigma (for heun: the previous step's corrector),
    in calibration and sampling alike."""
    base = _tiny(comfyui).build("sd15")
    for sampler, calls in (("uni_pc", [4, 2] * 4), ("heun", [4] + [2, 4, 4, 4] * 3 + [2, 4])):
        tiny = _tiny(comfyui)
        rec = _node(comfyui, "TrainFreeLinearAGCalibrate").calibrate(
            base, tiny.conditioning("sd15", 1, 4), tiny.conditioning("sd15", 2), {"samples": torch.zeros(4, 4, 8, 8)},
            8, 4.0, sampler, "normal", 1, 0, "lag_" + sampler, True)[0]
        assert rec.coef[1:].isfinite().all()
        model, rows = count_rows(_patch(comfyui, base, rec))
        assert torch.isfinite(_sample(comfyui, model, sampler=sampler)).all()
        assert rows == calls, (sampler, rows)


def test_two_expert_run_calibrated_per_step_range(comfyui, models_dir, caplog):
    """Two models over steps 0-4 and 4-8 of 8 (KSamplerAdvanced; add_noise off for the second): each calibrated for its
    part with start_at_step / end_at_step, each replaces negative-prompt evaluations in its part, with the first
    part's leftover noise kept or not; a whole run is refused with the first part's coefficients."""
    import comfy.sample

    tiny = _tiny(comfyui)
    high, low = tiny.build("sd15", 0), tiny.build("sd15", 1)
    pos, neg = tiny.conditioning("sd15", 1, 4), tiny.conditioning("sd15", 2)
    latent = torch.zeros(4, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    cal = _node(comfyui, "TrainFreeLinearAGCalibrate")

    def part(model, x, z, first, last, leftover=True):
        return comfy.sample.sample(model, z, 8, 4.0, "euler", "normal", pos, neg, x, start_step=first, last_step=last,
                                   force_full_denoise=not leftover, seed=5, disable_pbar=True)

    def calibrate(model, x, first, last, add_noise, name):
        return cal.calibrate(model, pos, neg, {"samples": x}, 8, 4.0, "euler", "normal", 1, 5, name, True,
                             start_at_step=first, end_at_step=last, add_noise=add_noise)[0]

    rec_high = calibrate(high, latent, 0, 4, True, "high")
    stage1 = part(high, latent, noise, 0, 4)
    rec_low = calibrate(low, stage1, 4, 8, False, "low")
    assert rec_high.steps == rec_low.steps == 4 and rec_high.keys["steps_range"] == "0:4"
    assert float(rec_high.r2[1:].min()) > 0.99 and float(rec_low.r2[1:].min()) > 0.99
    with caplog.at_level(logging.INFO, logger="trainfree"):
        caplog.clear()
        out1 = part(_patch(comfyui, high, rec_high), latent, noise, 0, 4)
        part(_patch(comfyui, high, rec_high), latent, noise, 0, 4, leftover=False)   # last sigma 0: also its part
        part(_patch(comfyui, low, rec_low), out1, torch.zeros_like(out1), 4, 8)
    assert caplog.text.count("LinearAG replaced 8 of 16 unconditional evaluations") == 3, caplog.text   # 4 rows x 4
    with pytest.raises(ValueError, match=r"calibrated for 4 steps \(steps 0-4 of 8, KSamplerAdvanced\)"):
        _sample(comfyui, _patch(comfyui, high, rec_high), batch=4)
