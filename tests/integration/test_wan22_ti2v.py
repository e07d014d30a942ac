"""Wan 2.2 TI2V 5B (model_base.WAN22: Wan 2.1's network on a 48-channel latent) in its image-to-video mode, as
ComfyUI's Wan22ImageToVideoLatent sets it up: the start image's latent in the first frame, held by a noise mask, so
ComfyUI gives each frame its own timestep (2-D timesteps into the network). The pack's MODEL patches must leave that
frame as it is and act on the others; neutral settings are bit-identical to the plain model; the pack's KSampler
entries hold the frame too. (Text-to-video, and the shipped examples on this family: test_example_workflows.)"""
import logging
import re

import pytest
import torch

PATCHES = {   # node: (patch(node, model, setting, a negative prompt), a neutral and an acting setting)
    "TrainFreePAG": (lambda n, m, s, neg: n.patch(m, s, "block.1", 0.0, 1.0)[0], 0.0, 3.0),
    "TrainFreeNASA": (lambda n, m, s, neg: n.patch(m, neg, s, 0.0, 1.0)[0], 0.0, 0.5),
    "TrainFreeDiTCache": (lambda n, m, s, neg: n.patch(m, s, 1, 0)[0], 1, 3),
    "TrainFreeAdaptiveGuidance": (lambda n, m, s, neg: n.patch(m, s)[0], 1.0, 0.5),
}


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _ti2v(comfyui, model, steps=8, cfg=3.0, sampler="euler"):
    """Sample ``model`` from a start latent held in the first frame by a noise mask; also record the timestep
    shapes the network got."""
    import comfy.patcher_extension as pe
    import comfy.sample

    tiny = _tiny(comfyui)
    shape = tiny.latent_shape("wan22", 1)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, 1, *shape[2:])
    mask[:, :, :1] = 0.0
    seen = []
    m = model.clone()

    def spy(executor, x, t, *args, **kwargs):
        seen.append(tuple(t.shape))
        return executor(x, t, *args, **kwargs)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_timesteps", spy)
    out = comfy.sample.sample(m, noise, steps, cfg, sampler, "simple", tiny.conditioning("wan22", 1),
                              tiny.conditioning("wan22", 2), start, noise_mask=mask, seed=4, disable_pbar=True)
    return out, start, seen


@pytest.mark.parametrize("node", list(PATCHES))
def test_patches_keep_the_start_frame_and_act_on_the_rest(comfyui, caplog, node):
    wan22, neg = _tiny(comfyui).build("wan22"), _tiny(comfyui).conditioning("wan22", 3)
    plain, start, steps = _ti2v(comfyui, wan22)
    assert steps and all(len(s) == 2 and s[1] > 1 for s in steps), steps      # per-frame timesteps reached the network
    torch.testing.assert_close(plain[:, :, :1], start[:, :, :1], rtol=0, atol=1e-5)
    make, neutral, acting = PATCHES[node]
    instance = comfyui.nodes.NODE_CLASS_MAPPINGS[node]()
    assert torch.equal(_ti2v(comfyui, make(instance, wan22, neutral, neg))[0], plain)
    with caplog.at_level(logging.INFO):
        acted = _ti2v(comfyui, make(instance, wan22, acting, neg))[0]
    assert torch.isfinite(acted).all()
    assert torch.equal(acted[:, :, :1], plain[:, :, :1])                     # the start frame is held
    assert (acted[:, :, 1:] - plain[:, :, 1:]).abs().max() > 1e-3 * plain.abs().max()
    if node == "TrainFreeDiTCache":
        cached = [int(n) for n in re.findall(r"DiT block cache .*: \d+ full and (\d+) cached evaluations", caplog.text)]
        assert cached and cached[-1] > 0
    if node == "TrainFreeAdaptiveGuidance":
        assert re.search(r"Adaptive Guidance skipped [1-9]\d* of", caplog.text)


@pytest.mark.parametrize("sampler", ["trainfree_ghvb", "trainfree_dpmpp_2m_hb", "trainfree_ts_dpmpp_2m"])
def test_the_dropdown_samplers_keep_the_start_frame(comfyui, sampler):
    """The pack's KSampler entries under the noise mask and per-frame timesteps: the start frame is held, the rest
    is sampled (finite, and not Euler's result)."""
    model = _tiny(comfyui).build("wan22")
    euler, start, _ = _ti2v(comfyui, model)
    out = _ti2v(comfyui, model, sampler=sampler)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, :1], start[:, :, :1], rtol=1e-5, atol=1e-5)   # multistep rounding
    assert (out[:, :, 1:] - euler[:, :, 1:]).abs().max() > 1e-4 * euler.abs().max()
