"""PixArt's attention calls and blocks get the forward's transformer options from the pack (nodes/pixart_options.py),
for the forwards of a model one of its nodes patched only, and ComfyUI's attention function, the network's hooks and
the pack's record of the forward are as they were after a run, a failed run and an unpatched model's run."""
import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny


def _chain(comfyui, base, neg):
    nodes = comfyui.nodes.NODE_CLASS_MAPPINGS
    model = _nasa(comfyui, base, neg)
    model = nodes["TrainFreePAG"]().patch(model, 2.0, "block.1", 0.0, 1.0)[0]
    return nodes["TrainFreeDiTCache"]().patch(model, 3, 0, 1)[0]


def test_the_options_reach_the_calls_of_patched_forwards_only_and_nothing_stays(comfyui):
    import comfy.ldm.pixart.blocks as pixart_blocks

    mod = comfyui.module_of("TrainFreeNASA").nasa_cosmos.pixart_options
    tiny = _tiny(comfyui)
    base = tiny.build("pixart")
    dm = base.model.diffusion_model
    own = pixart_blocks.optimized_attention
    pos, neg, noise = tiny.conditioning("pixart", 1), tiny.conditioning("pixart", 2), _noise("pixart")
    seen = []                       # (the name's value, the options' keys) at every self-attention of block 0
    hook = dm.blocks[0].attn.register_forward_pre_hook(
        lambda m, a: seen.append((pixart_blocks.optimized_attention is own, sorted(mod.current()))))
    try:
        _sample(base, pos, pos, noise, steps=2)
        assert seen == [(True, [])] * 2                   # an unpatched model: ComfyUI's own function, no options
        seen.clear()
        model = _chain(comfyui, base, neg)
        assert len(model.wrappers["apply_model"][mod.KEY]) == 1          # three nodes, one wrapper
        _sample(model, pos, pos, noise, steps=4)
        assert seen and all(not ours and "optimized_attention_override" in keys for ours, keys in seen)
        assert pixart_blocks.optimized_attention is own and not dm._forward_pre_hooks and mod.current() == {}
        bad = model.clone()
        bad.set_model_patch_replace(lambda args, extra: 1 / 0, "dit", "double_block", 1)
        with pytest.raises(ZeroDivisionError):
            _sample(bad, pos, pos, noise, steps=2)
        assert pixart_blocks.optimized_attention is own and not dm._forward_pre_hooks and mod.current() == {}
    finally:
        hook.remove()


def test_a_call_that_brings_its_own_options_keeps_them(comfyui):
    """A later ComfyUI whose PixArt passes its options itself: the pack's function does not replace them."""
    mod = comfyui.module_of("TrainFreeNASA").nasa_cosmos.pixart_options
    got = []
    attention = mod._handing_to(lambda *a, **kw: got.append(kw.get("transformer_options")))
    mod._running.append({"from": "the pack"})
    try:
        attention(torch.zeros(1), transformer_options={"from": "the network"})
        attention(torch.zeros(1))
    finally:
        mod._running.pop()
    assert got == [{"from": "the network"}, {"from": "the pack"}]
