"""Adaptive Guidance as a MODEL patch in ComfyUI: plain KSampler path, evaluations saved, composition."""
import logging

import pytest
import torch

from probes import count_rows


def _sample(comfyui, model, cfg=4.0, steps=6, batch=1, sampler="euler"):
    import comfy.sample

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    latent = torch.zeros(batch, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", tiny.conditioning("sd15", 1, batch),
                               tiny.conditioning("sd15", 2, batch), latent, seed=4, disable_pbar=True)


def _ag(comfyui, model, threshold):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]().patch(model, threshold)[0]


def test_threshold_one_is_plain_cfg(comfyui):
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    base = tiny.build("sd15")
    assert torch.equal(_sample(comfyui, _ag(comfyui, base, 1.0)), _sample(comfyui, base))


def test_switched_off_batch_skips_the_unconditional_pass(comfyui, caplog):
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model, rows = count_rows(_ag(comfyui, tiny.build("sd15"), 0.0))     # switches off at the first step
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out = _sample(comfyui, model, steps=6, batch=2)
    assert torch.isfinite(out).all()
    assert sum(rows) == 2 * 2 + 5 * 2                                   # step 1 cond+uncond, then cond only
    assert "skipped 10 of 12 unconditional evaluations" in caplog.text
    again, rows2 = count_rows(_ag(comfyui, tiny.build("sd15"), 0.0))
    _sample(comfyui, again, steps=4, batch=3)                           # fresh state per run and batch size
    assert sum(rows2) == 3 * 2 + 3 * 3


def test_cfg_one_and_other_patches(comfyui):
    import comfy_extras.nodes_pag as pag

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    base = tiny.build("sd15")
    assert torch.equal(_sample(comfyui, _ag(comfyui, base, 0.5), cfg=1.0), _sample(comfyui, base, cfg=1.0))
    both = pag.PerturbedAttentionGuidance.execute(_ag(comfyui, base, 0.9999), 2.0)[0]
    assert torch.isfinite(_sample(comfyui, both, sampler="dpmpp_2m")).all()


def test_guider_variant_matches_the_patch(comfyui):
    """The GUIDER gives what plain KSampler gives with the patched model, through SamplerCustomAdvanced."""
    from prompts import custom_advanced

    prompt = custom_advanced("TrainFreeGHVBSampler", {"order": 2.0}, steps=5, seed=3)
    prompt["guider"] = {"class_type": "TrainFreeAdaptiveGuidanceGuider", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 4.0, "threshold": 0.5}}
    ok, out, err = comfyui.run(prompt)
    assert ok, err
    prompt["patch"] = {"class_type": "TrainFreeAdaptiveGuidance", "inputs": {"model": ["ckpt", 0], "threshold": 0.5}}
    prompt["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["patch", 0], "positive": ["pos", 0],
                                                              "negative": ["neg", 0], "cfg": 4.0}}
    ok2, out2, err2 = comfyui.run(prompt)
    assert ok2, err2
    assert out["stats"]["sum"] == out2["stats"]["sum"]


def _run_rows(model, pos, neg, noise, steps=6):
    import comfy.sample

    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", pos, neg, torch.zeros_like(noise),
                               seed=5, disable_pbar=True)


def _row(cond, i):
    """Row i of a batched CONDITIONING (its tensor and per-row extras such as pooled_output)."""
    t, extra = cond[0]
    return [[t[i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) and v.shape[0] == t.shape[0] else v
                          for k, v in extra.items()}]]


SHAPES = {"sd15": (4, 8, 8), "sdxl": (4, 8, 8), "flux": (16, 8, 8), "wan": (16, 2, 8, 8)}


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_rows_switch_off_on_their_own_and_only_guided_rows_pay(comfyui, caplog, arch):
    """Batch 2, different prompts: row 0's negative equals its prompt (agreement 1: switched off at the
    first step), row 1's differs (stays guided). From step 2 on only row 1's negative is evaluated, and
    each row is what a batch-1 run of its own prompts gives."""
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    base = tiny.build(arch)
    pos, other = tiny.conditioning(arch, 1, 2), tiny.conditioning(arch, 2, 2)
    neg = [[torch.cat([pos[0][0][:1], other[0][0][1:]]), dict(other[0][1])]]
    if "pooled_output" in pos[0][1]:
        neg[0][1]["pooled_output"] = torch.cat([pos[0][1]["pooled_output"][:1], other[0][1]["pooled_output"][1:]])
    noise = torch.randn((2, *SHAPES[arch]), generator=torch.Generator().manual_seed(5))
    model, rows = count_rows(_ag(comfyui, base, 0.999999))
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out = _run_rows(model, pos, neg, noise)
    assert rows == [4] + [2, 1] * 5                              # step 1 full CFG; then cond x2 + uncond x1
    assert "skipped 5 of 12 unconditional evaluations" in caplog.text
    plain = _run_rows(base, pos, neg, noise)
    tol = 2e-6 * float(plain.abs().max())     # float32 batching noise: plain CFG batch 2 vs 1 differs by 1e-6 rel.
    for i in range(2):
        alone = _run_rows(_ag(comfyui, base, 0.999999), _row(pos, i), _row(neg, i), noise[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=tol)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=tol)    # row 1 never switches: plain CFG


def test_saved_evaluations_are_shown_on_the_node(comfyui, monkeypatch):
    import server

    sent = []

    class FakeServer:
        def send_progress_text(self, text, node_id, sid=None):
            sent.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", FakeServer(), raising=False)
    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]()
    _sample(comfyui, node.patch(tiny.build("sd15"), 0.0, unique_id="7")[0])
    assert sent == [("7", "Adaptive Guidance: skipped 5 of 6 negative-prompt evaluations (83%)")]
