"""A calibration's model key must not depend on whether a LoRA happens to be baked into the weights."""
import sys

import torch


def _fp(comfyui, patcher):
    sup = sys.modules[comfyui.pack().__name__ + ".nodes.calibration_support"]
    sup._PRINTS.clear()                                    # recompute, do not read the per-process cache
    return sup.model_fingerprint(patcher)


def test_fingerprint_is_the_same_with_the_lora_baked_in_or_not(comfyui):
    import comfy.model_management as mm

    tiny = comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models
    base = tiny.build("sd15")
    lora = base.clone()
    key = next(k for k in base.model_state_dict() if k.endswith("attn2.to_q.weight"))
    lora.add_patches({key: (torch.full_like(base.model_state_dict()[key], 0.05),)}, 1.0)
    base_print, lora_print = _fp(comfyui, base), _fp(comfyui, lora)
    assert base_print != lora_print
    mm.load_models_gpu([lora])                             # ComfyUI patches the shared weights in place
    try:
        assert lora.backup, "the LoRA was not baked in: this test checks nothing"
        live = dict(base.model.diffusion_model.state_dict())[key[len("diffusion_model."):]]
        assert not torch.equal(live, lora.backup[key].weight)
        assert _fp(comfyui, base) == base_print
        assert _fp(comfyui, lora) == lora_print
    finally:
        mm.unload_all_models()
    assert not lora.backup and _fp(comfyui, lora) == lora_print and _fp(comfyui, base) == base_print
