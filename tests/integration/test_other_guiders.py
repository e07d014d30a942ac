"""The guidance patches with core guiders that are not CFG's (prompt, negative) pair.

DualCFGGuider evaluates [negative, middle, positive] and PerpNegGuider [positive, negative, empty] in one
calc_cond_batch call. Adaptive Guidance and LinearAG change the second prompt of CFG's pair; before 2026-12 they
took the middle prompt (or the perp-neg negative) for it and silently sampled something else. Now such calls
pass through (the image is the guider's own, bit for bit) and the node says why it was inactive. The other
MODEL patches act with these guiders as with CFG.
"""
import logging

import pytest
import torch

from prompts import custom_advanced

GUIDERS = ["dual regular", "dual nested", "perp-neg"]


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _guider(comfyui, model, kind):
    tiny = _tiny(comfyui)
    pos, middle, neg = (tiny.conditioning("sd15", i, 2) for i in (1, 2, 3))
    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    if kind.startswith("dual"):
        return classes["DualCFGGuider"]().get_guider(model, pos, middle, neg, 4.0, 3.0, kind.split()[1])[0]
    return classes["PerpNegGuider"].execute(model, pos, neg, tiny.conditioning("sd15", 4, 2), 4.0, 1.0)[0]


def _sample(comfyui, model, kind):
    import comfy.samplers

    guider = _guider(comfyui, model, kind)
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=4)


def _calibrate_linear_ag(comfyui, model):
    tiny = _tiny(comfyui)
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeLinearAGCalibrate"]()
    return node.calibrate(model, tiny.conditioning("sd15", 1, 4), tiny.conditioning("sd15", 2),
                          {"samples": torch.zeros(4, 4, 8, 8)}, 6, 4.0, "euler", "normal", 1, 0, "lag_guiders",
                          True)[0]


@pytest.mark.parametrize("kind", GUIDERS)
@pytest.mark.parametrize("method", ["Adaptive Guidance", "LinearAG"])
def test_guidance_patches_pass_other_guiders_through_and_say_so(comfyui, models_dir, caplog, kind, method):
    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    base = _tiny(comfyui).build("sd15")
    if method == "Adaptive Guidance":
        patched = classes["TrainFreeAdaptiveGuidance"]().patch(base, 0.0)[0]     # would skip from the 2nd step
    else:
        patched = classes["TrainFreeLinearAG"]().patch(base, _calibrate_linear_ag(comfyui, base), 0.0, 1.0)[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = _sample(comfyui, patched, kind)
    assert torch.equal(out, _sample(comfyui, base, kind))
    said = [r.getMessage() for r in caplog.records if method in r.getMessage()]
    assert said and "inactive: this guider evaluates 3 prompts per step" in said[-1], said


@pytest.mark.parametrize("kind", ["dual regular", "perp-neg"])
def test_guidance_patches_still_act_with_cfg_in_the_same_session(comfyui, caplog, kind):
    """A pass-through run leaves nothing behind: the same patched model then skips evaluations under CFG."""
    import comfy.sample

    patched = comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeAdaptiveGuidance"]().patch(_tiny(comfyui).build("sd15"),
                                                                                     0.0)[0]
    _sample(comfyui, patched, kind)
    tiny = _tiny(comfyui)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        comfy.sample.sample(patched, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), 6, 4.0,
                            "euler", "normal", tiny.conditioning("sd15", 1, 2), tiny.conditioning("sd15", 2, 2),
                            torch.zeros(2, 4, 8, 8), seed=1, disable_pbar=True)
    said = [r.getMessage() for r in caplog.records if "Adaptive Guidance skipped" in r.getMessage()]
    assert said and "skipped 10 of 12" in said[-1], said


OTHER = {   # patch -> (neutral inputs, acting inputs)
    "TrainFreePAG": ({"scale": 0.0, "layers": "", "start_percent": 0.0, "end_percent": 1.0},
                     {"scale": 2.0, "layers": "", "start_percent": 0.0, "end_percent": 1.0}),
    "TrainFreeNASA": ({"negative": ["neg", 0], "alpha": 0.0, "start_percent": 0.0, "end_percent": 1.0},
                      {"negative": ["neg", 0], "alpha": 0.3, "start_percent": 0.0, "end_percent": 1.0}),
    "TrainFreeDeepCache": ({"cache_interval": 1, "cache_depth": 1, "schedule": "uniform", "start_percent": 0.0,
                            "end_percent": 1.0},
                           {"cache_interval": 3, "cache_depth": 1, "schedule": "uniform", "start_percent": 0.0,
                            "end_percent": 1.0}),
}


def _graph(kind, patch):
    p = custom_advanced("KSamplerSelect", {"sampler_name": "euler"}, steps=6, batch=2, seed=3)
    src = ["ckpt", 0]
    if patch is not None:
        p["patch"] = {"class_type": patch[0], "inputs": dict(patch[1], model=src)}
        src = ["patch", 0]
    p["sched"]["inputs"]["model"] = src
    p["pos2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red boat"}}
    if kind == "perp-neg":
        p["guider"] = {"class_type": "PerpNegGuider", "inputs": {
            "model": src, "positive": ["pos", 0], "negative": ["neg", 0], "empty_conditioning": ["pos2", 0],
            "cfg": 4.0, "neg_scale": 1.0}}
    else:
        p["guider"] = {"class_type": "DualCFGGuider", "inputs": {
            "model": src, "cond1": ["pos", 0], "cond2": ["pos2", 0], "negative": ["neg", 0], "cfg_conds": 4.0,
            "cfg_cond2_negative": 3.0, "style": kind.split()[1]}}
    return p


@pytest.mark.parametrize("kind", GUIDERS)
@pytest.mark.parametrize("node", sorted(OTHER))
def test_other_patches_act_with_other_guiders(comfyui, kind, node):
    def digest(patch):
        ok, out, err = comfyui.run(_graph(kind, patch))
        assert ok, err
        assert "finite=True" in out["stats"]["text"][0]
        return out["stats"]["sha256"][0]

    plain = digest(None)
    assert digest((node, OTHER[node][0])) == plain
    assert digest((node, OTHER[node][1])) != plain
