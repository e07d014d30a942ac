"""The block patches the pack gives the DiTs whose forwards do not call them in ComfyUI 0.3.64 (nodes/block_patches.py:
Lumina 2's and OmniGen2's main layers, HiDream's double- and single-stream blocks, Cosmos-Predict2's and PixArt's
blocks): the DiT
cache through them, beside PAG's and NASA's call numbering (a cached block makes no attention call, which they are
told), and the network left as it was."""
import logging

import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny
from probes import perturbed_calls

ARCHS = ("lumina2", "omnigen2", "hidream", "cosmos_predict2", "pixart")
NAMES = {"lumina2": "Lumina 2", "omnigen2": "OmniGen2", "hidream": "HiDream", "cosmos_predict2": "Cosmos-Predict2",
         "pixart": "PixArt"}
# per family: the block PAG perturbs (after the one the cache skips), the call it sees (length, image rows), and the
# attention calls of a forward with the cached block's left uncounted, of those expected
PAG_AFTER_CACHED = {"lumina2": ("block.1", (32, (16, 32)), 3, 4), "omnigen2": ("block.1", (32, (16, 32)), 3, 4),
                    "hidream": ("single.0", (64, (0, 16)), 1, 2),        # [16 image; 16 T5; 2 x 16 Llama]
                    "cosmos_predict2": ("block.1", (16, None), 2, 4),    # a self-attention (its output V), 2 per block
                    "pixart": ("block.1", (400, None), 2, 4)}            # the same over a 40 x 40 latent
LISTS = {"lumina2": ("layers",), "omnigen2": ("layers",), "hidream": ("double_stream_blocks", "single_stream_blocks"),
         "cosmos_predict2": ("blocks",), "pixart": ("blocks",)}
LAST = {"lumina2": ("double_block", 1), "omnigen2": ("double_block", 1), "hidream": ("single_block", 0),
        "cosmos_predict2": ("double_block", 1), "pixart": ("double_block", 1)}


def _negative(tiny, arch, tokens=9):
    """A negative prompt of ``tokens`` tokens in the family's own conditioning form."""
    (t, extra), = tiny.conditioning(arch, 3)
    if arch == "hidream":
        return [[t, dict(extra, conditioning_llama3=extra["conditioning_llama3"][:, :, :tokens])]]
    if arch in ("cosmos_predict2", "pixart"):
        return [[t[:, :tokens], {}]]
    return [[t[:, :tokens], {"attention_mask": torch.ones(1, tokens, dtype=torch.long)}]]


def _cache(comfyui, model, interval, head=0, tail=1):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreeDiTCache"]().patch(model, interval, head, tail)[0]


def _pag(comfyui, model, layers):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, 2.0, layers, 0.0, 1.0)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_cached_block_keeps_pags_numbering_on_the_blocks_after_it(comfyui, monkeypatch, caplog, arch):
    """The cache skips the first block at cached steps (head 0, tail 1); PAG on the next block perturbs its call in
    every forward of its pass, cached or not, over the prompt's tokens (Lumina 2, OmniGen2: [16 caption; 16 image]);
    at interval 1 the pair is bit-identical to PAG alone, and with the skips reported nowhere (a mutation) the
    numbering stops with its error."""
    layer, call, made, expected = PAG_AFTER_CACHED[arch]
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    seen = perturbed_calls(comfyui, monkeypatch, arch)
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)

    def pag(model):
        return _pag(comfyui, model, layer)
    pag_alone = _sample(pag(base), pos, pos, noise, steps=7)
    assert seen == [call] * 7
    for first in ("pag", "cache"):
        seen.clear()
        model = _cache(comfyui, pag(base), 1) if first == "pag" else pag(_cache(comfyui, base, 1))
        assert torch.equal(_sample(model, pos, pos, noise, steps=7), pag_alone)
        seen.clear()
        model = _cache(comfyui, pag(base), 3) if first == "pag" else pag(_cache(comfyui, base, 3))
        with caplog.at_level(logging.INFO, logger="trainfree"):
            cached = _sample(model, pos, pos, noise, steps=7)
        assert seen == [call] * 7, first
        # steps 0, 3, 6 full, 4 cached, in the plain pass and in PAG's
        assert "6 full and 8 cached evaluations; span blocks run 6, skipped 8" in caplog.text
        assert 0 < float((cached - pag_alone).norm() / pag_alone.norm()) < 0.05
    monkeypatch.setattr(comfyui.module_of("TrainFreeDiTCache").block_patches.attention_chain, "skipped",
                        lambda to, calls: None)
    with pytest.raises(RuntimeError, match=rf"PAG \(TrainFree\) on {NAMES[arch]}: the network made {made} attention "
                                           rf"calls, {expected}"):
        _sample(_cache(comfyui, pag(base), 3), pos, pos, noise, steps=7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("order", ["nasa first", "cache first"])
def test_nasa_with_the_cache_from_the_first_layer(comfyui, caplog, arch, order):
    """NASA lengthens the text the cached span takes (9 negative tokens beside 16: Lumina 2's and OmniGen2's caption
    in the joint stream, HiDream's Llama layers beside its T5 tokens, Cosmos-Predict2's cross-attention context): at
    interval 1 the pair is bit-identical to NASA alone, at interval 3 the span is skipped at 5 of 8 steps (NASA's
    call count told of the skipped block) and the sample stays close."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, noise, neg = tiny.conditioning(arch, 1), _noise(arch), _negative(tiny, arch)

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
    """The stand-ins for the block lists live for a forward only: after a cached run (and one that fails inside it)
    the network's lists and state dict are its own; a model without block patches runs through the network's own
    loop."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    dm = base.model.diffusion_model
    names = LISTS[arch]
    lists, keys = {n: getattr(dm, n) for n in names}, list(dm.state_dict())
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    seen = []
    hook = getattr(dm, names[-1])[-1].register_forward_pre_hook(
        lambda mod, inp: seen.append(tuple(type(getattr(dm, n)).__name__ for n in names)))
    try:
        _sample(_cache(comfyui, base, 3), pos, pos, noise, steps=4)
        assert all(getattr(dm, n) is lists[n] for n in names) and list(dm.state_dict()) == keys
        assert seen and set(seen) == {("_Blocks",) * len(names)}
        seen.clear()
        _sample(base, pos, pos, noise, steps=2)
        assert seen and set(seen) == {("ModuleList",) * len(names)}
        bad = _cache(comfyui, base, 3).clone()
        bad.set_model_patch_replace(lambda args, extra: 1 / 0, "dit", *LAST[arch])
        with pytest.raises(ZeroDivisionError):
            _sample(bad, pos, pos, noise, steps=2)
        assert all(getattr(dm, n) is lists[n] for n in names)
    finally:
        hook.remove()


def test_hidream_edit_model_through_the_joined_stream(comfyui, caplog):
    """HiDream-E1 joins the image to edit to the latent on its width; the span over both blocks (head 0, tail 0)
    carries it from the double-stream block into the joined stream: bit-identical at interval 1, 5 of 8 steps cached
    at interval 3 and close, and another edit image changes the cached sample as it changes the plain one (a change of
    0.3% on this tiny model)."""
    tiny = _tiny(comfyui)
    base = tiny.build("hidream")
    (t, extra), = tiny.conditioning("hidream", 1)
    noise = _noise("hidream")

    def pos(seed):
        image = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
        return [[t, dict(extra, concat_latent_image=image)]]
    ref = _sample(base, pos(7), pos(7), noise, steps=8)
    assert torch.equal(_sample(_cache(comfyui, base, 1, 0, 0), pos(7), pos(7), noise, steps=8), ref)
    with caplog.at_level(logging.INFO, logger="trainfree"):
        out = _sample(_cache(comfyui, base, 3, 0, 0), pos(7), pos(7), noise, steps=8)
        other = _sample(_cache(comfyui, base, 3, 0, 0), pos(8), pos(8), noise, steps=8)
    assert "3 full and 5 cached evaluations; span blocks run 6, skipped 10" in caplog.text
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05
    effect = _sample(base, pos(8), pos(8), noise, steps=8) - ref         # what the image changes without the cache
    assert float(((other - out) - effect).norm() / effect.norm()) < 0.35            # measured 0.22


# each family's stand-in called as its network's loop calls the block, with one keyword more
CALLS = {"lumina2": lambda run, x: run(x, None, None, None, transformer_options={}, later=1),
         "hidream": lambda run, x: run(image_tokens=x, image_tokens_masks=None, text_tokens=x, adaln_input=None,
                                       rope=None, transformer_options={}, later=1),
         "cosmos_predict2": lambda run, x: run(x, None, x, rope_emb_L_1_1_D=None, adaln_lora_B_T_3D=None,
                                               extra_per_block_pos_emb=None, transformer_options={}, later=1),
         "pixart": lambda run, x: run(x, x, None, None, (2, 2), later=1)}


@pytest.mark.parametrize("arch", ["lumina2", "hidream", "cosmos_predict2", "pixart"])
def test_a_keyword_a_later_comfyui_adds_reaches_the_block(comfyui, arch):
    """A later ComfyUI may call its blocks with one keyword more (the kind of change that broke other packs' forward
    patches): each stand-in hands it on to the block, with or without a replacement on it."""
    mod = comfyui.module_of("TrainFreeDiTCache").block_patches
    dm = _tiny(comfyui).build(arch).model.diffusion_model
    seen = []

    def block(*a, **kw):
        seen.append(kw.get("later"))
        x = kw.get("image_tokens", a[0] if a else None)
        return (x, kw["text_tokens"]) if kw.get("text_tokens") is not None else x
    x = torch.zeros(1, 4, 8)
    _, make = mod.lists(dm)[0]
    CALLS[arch](make(0, block), x)
    to = {"patches_replace": {"dit": {("double_block", 0): lambda args, extra: (seen.append("replaced"),
                                                                                 extra["original_block"](args))[1]}}}
    if arch == "pixart":        # its forward's options come from nodes/pixart_options.py, not from its loop
        mod.pixart_options._running.append(to)
        try:
            CALLS[arch](make(0, block), x)
        finally:
            mod.pixart_options._running.pop()
    else:
        CALLS[arch](lambda *a, **kw: make(0, block)(*a, **dict(kw, transformer_options=to)), x)
    assert seen == [1, "replaced", 1]
