"""Every pack sampler inpainting through ComfyUI (a latent noise mask, as SetLatentNoiseMask / VAEEncodeForInpaint
give): the area outside the mask must come back as the source latent, as it does with core's samplers.

ComfyUI's KSamplerX0Inpaint replaces the guided prediction outside the mask by the source latent at every call;
samplers that only use that prediction end exactly there. The CFG++ samplers also use the unconditional
prediction, which the pack masks the same way: before 2026-12 the PLMS / GHVB CFG++ entries' last step brought
the raw unconditional prediction back into the kept area (errors of 1-20 on a latent of scale 1).
"""
import pytest
import torch

from prompts import SAMPLER_NODES


def _dropdown():
    import comfy.samplers

    return [n for n in comfy.samplers.KSampler.SAMPLERS if n.startswith("trainfree_")]


def _samplers(comfyui):
    import comfy.samplers

    out = {name: comfy.samplers.sampler_object(name) for name in _dropdown()}
    nodes = dict(SAMPLER_NODES, TrainFreeDPMSolverV3Sampler={"order": 2, "pseudo_order": False, "corrector": "full",
                                                             "lower_order_final": True},
                 TrainFreeDCSolverSampler={"order": 2, "variant": "bh2"},
                 TrainFreeCFGppSampler={"solver": "dpm_solver_v3"})
    for node, inputs in nodes.items():
        cls = comfyui.nodes.NODE_CLASS_MAPPINGS[node]
        out[node] = getattr(cls(), cls.FUNCTION)(**inputs)[0]
    return out


def _inpaint(comfyui, arch, sampler, mask, differential=False, negative=2):
    import comfy.sample
    import comfy.samplers

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    model = tiny.build(arch)
    if differential:
        dd = comfyui.nodes.NODE_CLASS_MAPPINGS["DifferentialDiffusion"]
        model = dd.execute(model)[0]
    shape = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, 16, 16)).shape
    source = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.8
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                             "normal" if arch == "flux" else "karras", 10)
    out = comfy.sample.sample_custom(model, noise, 4.0, sampler, sigmas, tiny.conditioning(arch, 1),
                                     tiny.conditioning(arch, negative), source, noise_mask=mask, seed=3)
    return source, out


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_every_pack_sampler_keeps_the_unmasked_latent(comfyui, arch):
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1.0                                       # regenerate the left half, keep the right half
    kept = mask.expand(1, 1, 16, 16)[0, 0] == 0
    bad = {}
    for name, sampler in _samplers(comfyui).items():
        source, out = _inpaint(comfyui, arch, sampler, mask)
        assert torch.isfinite(out).all(), name
        err = float((out - source)[..., kept].abs().max())
        if err > 1e-4:
            bad[name] = err
        assert float((out - source)[..., ~kept].abs().max()) > 0.1, name     # and the masked half was redrawn
    assert not bad, bad


@pytest.mark.parametrize("solver", ["ghvb", "plms_hb"])
def test_cfg_pp_inpainting_with_a_mask_function_is_its_base_solver_without_guidance(comfyui, solver):
    """Differential Diffusion's mask function changes the mask at every step. With the negative prompt equal to
    the positive one CFG++ is its base solver, also when inpainting: its unconditional prediction is masked
    with that step's mask, as the guided one is (the raw mask, or none, gives another result)."""
    import comfy.samplers

    mask = torch.linspace(0.0, 1.0, 16).repeat(16, 1)[None, None]
    base = _inpaint(comfyui, "sd15", comfy.samplers.sampler_object(f"trainfree_{solver}"), mask, True, negative=1)
    pp = _inpaint(comfyui, "sd15", comfy.samplers.sampler_object(f"trainfree_{solver}_cfg_pp"), mask, True, negative=1)
    torch.testing.assert_close(pp[1], base[1], rtol=1e-5, atol=1e-5)
    assert float((base[1] - base[0]).abs().max()) > 0.1
