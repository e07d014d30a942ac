"""The block patches the pack gives the main layers of Lumina 2 and OmniGen2 (nodes/block_patches.py), which their
forwards do not call in ComfyUI 0.3.64: the DiT cache through them, beside PAG's and NASA's call numbering (a cached
layer makes no attention call, which they are told), and the network left as it was."""
import logging

import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny
from probes import perturbed_calls

ARCHS = ("lumina2", "omnigen2")
NAMES = {"lumina2": "Lumina 2", "omnigen2": "OmniGen2"}


def _cache(comfyui, model, interval, head=0, tail=1):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDiTCache"]().patch(model, interval, head, tail)[0]


def _pag(comfyui, model, layers="block.1"):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, 2.0, layers, 0.0, 1.0)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_cached_layer_keeps_pags_numbering_on_the_layers_after_it(comfyui, monkeypatch, caplog, arch):
    """The cache skips layer 0 at cached steps (head 0, tail 1); PAG on block.1 perturbs layer 1's call in every
    forward of its pass, cached or not, over the prompt's [16 caption; 16 image] tokens; at interval 1 the pair is
    bit-identical to PAG alone, and with the skips reported nowhere (a mutation) the numbering stops with its error."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    seen = perturbed_calls(comfyui, monkeypatch, arch)
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    pag_alone = _sample(_pag(comfyui, base), pos, pos, noise, steps=7)
    assert seen == [(32, (16, 32))] * 7
    for first in ("pag", "cache"):
        seen.clear()
        model = _cache(comfyui, _pag(comfyui, base), 1) if first == "pag" else _pag(comfyui, _cache(comfyui, base, 1))
        assert torch.equal(_sample(model, pos, pos, noise, steps=7), pag_alone)
        seen.clear()
        model = _cache(comfyui, _pag(comfyui, base), 3) if first == "pag" else _pag(comfyui, _cache(comfyui, base, 3))
        with caplog.at_level(logging.INFO, logger="trainfree"):
            cached = _sample(model, pos, pos, noise, steps=7)
        assert seen == [(32, (16, 32))] * 7, first
        # steps 0, 3, 6 full, 4 cached, in the plain pass and in PAG's
        assert "6 full and 8 cached evaluations; span blocks run 6, skipped 8" in caplog.text
        assert 0 < float((cached - pag_alone).norm() / pag_alone.norm()) < 0.05
    monkeypatch.setattr(comfyui.module_of("TrainFreeDiTCache").block_patches.attention_chain, "skipped",
                        lambda to, calls: None)
    with pytest.raises(RuntimeError, match=rf"PAG \(TrainFree\) on {NAMES[arch]}: the network made 3 attention "
                                           r"calls, 4"):
        _sample(_cache(comfyui, _pag(comfyui, base), 3), pos, pos, noise, steps=7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("order", ["nasa first", "cache first"])
def test_nasa_with_the_cache_from_the_first_layer(comfyui, caplog, arch, order):
    """NASA lengthens the caption of the joint stream the cached span takes (9 negative tokens beside 16): at interval
    1 the pair is bit-identical to NASA alone, at interval 3 the span is skipped at 5 of 8 steps (NASA's call count
    told of the skipped layer) and the sample stays close."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    t = tiny.conditioning(arch, 3)[0][0][:, :9]
    neg = [[t, {"attention_mask": torch.ones(1, 9, dtype=torch.long)}]]

    def both(interval):
        return _cache(comfyui, _nasa(comfyui, base, neg), interval, 0, 1) if order == "nasa first" else \
            _nasa(comfyui, _cache(comfyui, base, interval, 0, 1), neg)
    ref = _sample(_nasa(comfyui, base, neg), pos, pos, noise, steps=8)
    assert torch.equal(_sample(both(1), pos, pos, noise, steps=8), ref)
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out = _sample(both(3), pos, pos, noise, steps=8)
    assert "5 cached evaluations" in caplog.text
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_the_network_is_left_as_it_was(comfyui, arch):
    """The stand-in for the layers lives for a forward only: after a cached run (and one that fails inside it) the
    network's layers and state dict are its own; a model without block patches runs through the network's own loop."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    dm = base.model.diffusion_model
    layers, keys = dm.layers, list(dm.state_dict())
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    seen = []
    hook = dm.layers[1].register_forward_pre_hook(lambda mod, inp: seen.append(type(dm.layers).__name__))
    try:
        _sample(_cache(comfyui, base, 3), pos, pos, noise, steps=4)
        assert dm.layers is layers and list(dm.state_dict()) == keys and seen and set(seen) == {"_Layers"}
        seen.clear()
        _sample(base, pos, pos, noise, steps=2)
        assert seen and set(seen) == {"ModuleList"}
        bad = _cache(comfyui, base, 3).clone()
        bad.set_model_patch_replace(lambda args, extra: 1 / 0, "dit", "double_block", 1)
        with pytest.raises(ZeroDivisionError):
            _sample(bad, pos, pos, noise, steps=2)
        assert dm.layers is layers
    finally:
        hook.remove()
