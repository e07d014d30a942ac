"""TrainFreePAG on AuraFlow (block patches, as Flux), HiDream-I1, Cosmos-Predict2, OmniGen2 and PixArt (no block
patches in ComfyUI 0.3.64: attention calls numbered per forward, nodes/pag_counted.py, nodes/pag_omnigen2.py; PixArt's
calls given the forward's options, nodes/pixart_options.py): the chosen
block's attention equals an independent masked attention, one perturbed call per chosen block and forward on the
image rows (a second latent size, a batch, an edit model's image joined to the latent, OmniGen2's reference images),
a clear stop where the call count differs, and the numbering beside core's EasyCache, which skips whole forwards."""
import logging
import re

import pytest
import torch

ARCHS = ("auraflow", "hidream", "cosmos_predict2", "omnigen2", "pixart")
# (latent size, image tokens) of each family's tests: 8 x 8 in patches of 2, PixArt's smallest and an oblong one
SIZES = {"pixart": (((40, 40), 400), ((36, 44), 396))}


def _tiny(comfyui):
    return comfyui.module_of("TrainFreeTestTinyCheckpoint").tiny_models


def _pag(comfyui, model, scale=3.0, layers=""):
    return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, scale, layers, 0.0, 1.0)[0]


def _apply(model, arch, x, to, **extra):
    """One forward of the tiny model at sigma 0.6 with its conditioning, under transformer_options ``to``."""
    tiny_cond = model.tiny.conditioning(arch, 1)[0]
    kw = {"c_crossattn": tiny_cond[0]}
    if arch == "hidream":
        kw.update(y=tiny_cond[1]["pooled_output"], encoder_hidden_states_llama3=tiny_cond[1]["conditioning_llama3"])
    if arch == "omnigen2":      # what its extra_conds give for a prompt of 16 real tokens
        kw.update(num_tokens=16)
    return model.model.apply_model(x, torch.full((x.shape[0],), 0.6), transformer_options=dict(to), **kw, **extra)


def _build(comfyui, arch):
    tiny = _tiny(comfyui)
    m = tiny.build(arch)
    m.tiny = tiny
    return m


def _latent(tiny, arch, batch=1, size=None, seed=0):
    return torch.randn(tiny.latent_shape(arch, batch, size), generator=torch.Generator().manual_seed(seed))


def _attention_module(dm, arch, kind, index):
    if arch == "auraflow":
        return (dm.double_layers if kind == "double" else dm.single_layers)[index].attn
    if arch == "hidream":
        return (dm.double_stream_blocks if kind == "double" else dm.single_stream_blocks)[index].block.attn1
    if arch == "omnigen2":
        return dm.layers[index].attn
    if arch == "pixart":
        return dm.blocks[index].attn
    return dm.blocks[index].self_attn


def _image_rows(arch, n, img):
    """Where the image tokens are, as read in ComfyUI 0.3.64's networks: AuraFlow [register + text; image], OmniGen2
    [text; reference images; image], HiDream [image; text], Cosmos and PixArt a pure self-attention over the image
    tokens."""
    if arch in ("auraflow", "omnigen2"):
        return n - img, n
    return 0, img


def _manual(monkeypatch, dm, arch, kind, index, img):
    """The model with the chosen block's attention computed by ComfyUI's own attention under an explicit mask hiding
    every other image key from each image query (the text keys and its own key stay visible)."""
    import importlib

    module = importlib.import_module("comfy.ldm.pixart.blocks" if arch == "pixart" else type(dm).__module__)
    name = "optimized_attention_masked" if arch == "omnigen2" else "optimized_attention"
    real_attention = getattr(module, name)
    active = [False]

    def masked(q, k, v, heads, mask=None, **kw):
        if not active[0]:
            return real_attention(q, k, v, heads, mask=mask, **kw)
        assert mask is None
        n = q.shape[-2] if kw.get("skip_reshape") else q.shape[1]
        start, end = _image_rows(arch, n, img)
        hide = torch.zeros(n, n)
        hide[start:end, start:end] = float("-inf")
        hide[range(start, end), range(start, end)] = 0.0
        return real_attention(q, k, v, heads, mask=hide.reshape(1, 1, n, n).to(q.dtype), **kw)

    attn = _attention_module(dm, arch, kind, index)
    real_forward = attn.forward

    def flagged(*a, **kw):
        active[0] = True
        try:
            return real_forward(*a, **kw)
        finally:
            active[0] = False
    monkeypatch.setattr(module, name, masked)
    monkeypatch.setattr(attn, "forward", flagged)


LAYERS = [("auraflow", "double", 0), ("auraflow", "single", 1), ("hidream", "double", 0), ("hidream", "single", 0),
          ("cosmos_predict2", "block", 0), ("cosmos_predict2", "block", 1), ("omnigen2", "block", 0),
          ("omnigen2", "block", 1), ("pixart", "block", 0), ("pixart", "block", 1)]


@pytest.mark.parametrize("arch,kind,index", LAYERS)
def test_the_perturbed_block_equals_an_independent_masked_attention(comfyui, monkeypatch, arch, kind, index):
    """The perturbed prediction equals the model whose chosen attention runs ComfyUI's own attention with an explicit
    mask: image queries see the text keys and their own key only (Cosmos' and PixArt's self-attention: its own key
    only, V)."""
    m = _build(comfyui, arch)
    mod = comfyui.module_of("TrainFreePAG")
    dm = m.model.diffusion_model
    x = _latent(m.tiny, arch)
    counts = mod.pag_counted.layout(dm, arch) if arch in mod.pag_counted.KINDS_OF else \
        mod.pag_omnigen2.layer_counts(dm) if arch == "omnigen2" else None
    opts = mod.perturbed_options(m.model_options, arch, [(kind, index, None)], counts=counts)
    ours = _apply(m, arch, x, opts["transformer_options"])
    plain = _apply(m, arch, x, m.model_options["transformer_options"])
    _manual(monkeypatch, dm, arch, kind, index, img=SIZES.get(arch, (((8, 8), 16),))[0][1])
    manual = _apply(m, arch, x, m.model_options["transformer_options"])
    monkeypatch.undo()
    assert (ours - plain).abs().max() > 1e-4 * plain.abs().max()
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-5 * float(plain.abs().max()))


def _spy(monkeypatch, mod):
    seen = []
    real = mod.pag_math.perturbed_call

    def spy(img_range, *a, **kw):
        n = a[0].shape[-2] if kw.get("skip_reshape") else a[0].shape[1]
        seen.append((a[0].shape[0], n, img_range(n)))
        return real(img_range, *a, **kw)
    monkeypatch.setattr(mod.pag_math, "perturbed_call", spy)
    monkeypatch.setattr(mod, "_perturbed_attention", spy)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_one_perturbed_call_per_chosen_block_and_step_on_the_image_rows(comfyui, monkeypatch, arch):
    """Sampling with CFG (a batch of 2, 3 steps): one perturbed call per chosen block per step, on the conditional
    rows only, with the image rows of that latent size; the same model then runs a 6x10 latent (15 patches; PixArt:
    40 x 40, then 36 x 44)."""
    import comfy.sample

    m = _build(comfyui, arch)
    mod = comfyui.module_of("TrainFreePAG")
    layers = {"auraflow": "double.0, single.1", "hidream": "double.0, single.0", "cosmos_predict2": "block.1",
              "omnigen2": "block.0, block.1", "pixart": "block.0"}[arch]
    guided = _pag(comfyui, m, 3.0, layers)
    seen = _spy(monkeypatch, mod)
    prompts = 1 if arch == "omnigen2" else 2      # 0.3.64's OmniGen2 sums a batch of prompts' masks into one count
    pos, neg = m.tiny.conditioning(arch, 1, prompts), m.tiny.conditioning(arch, 2, prompts)
    # text tokens beside the image: AuraFlow's register tokens and prompt; HiDream's T5 and twice a Llama layer
    text = m.model.diffusion_model.register_tokens.shape[1] + 16 if arch == "auraflow" else \
        16 + 2 * 16 if arch == "hidream" else 16 if arch == "omnigen2" else 0
    for size, img in SIZES.get(arch, (((8, 8), 16), ((6, 10), 15))):
        seen.clear()
        noise = _latent(m.tiny, arch, 2, size, seed=4)
        comfy.sample.sample(guided, noise, 3, 3.0, "euler", "normal", pos, neg, torch.zeros_like(noise), seed=4,
                            disable_pbar=True)
        n = img + text
        rows = None if arch in ("cosmos_predict2", "pixart") else _image_rows(arch, n, img)
        assert seen == [(2, n, rows)] * (3 * len(layers.split(",")))


def test_hidream_edit_image_tokens_count_as_image(comfyui, monkeypatch):
    """HiDream-E1 joins the image to edit to the latent on its width: the perturbed rows cover both (32 tokens of an
    8x8 latent and its 8x8 image), and the prediction equals the explicit-mask model's."""
    m = _build(comfyui, "hidream")
    mod = comfyui.module_of("TrainFreePAG")
    dm = m.model.diffusion_model
    x, image = _latent(m.tiny, "hidream"), _latent(m.tiny, "hidream", seed=7)
    opts = mod.perturbed_options(m.model_options, "hidream", [("single", 0, None)],
                                 counts=mod.pag_counted.layout(dm, "hidream"))
    seen = _spy(monkeypatch, mod)
    ours = _apply(m, "hidream", x, opts["transformer_options"], image_cond=image)
    assert seen == [(1, 32 + 48, (0, 32))]
    monkeypatch.undo()
    _manual(monkeypatch, dm, "hidream", "single", 0, img=32)
    manual = _apply(m, "hidream", x, m.model_options["transformer_options"], image_cond=image)
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-5 * float(manual.abs().max()))


def test_omnigen2_reference_images_count_as_image(comfyui, monkeypatch):
    """An OmniGen2 edit brings reference latents: its reference refiner adds calls before the main layers (the
    numbering shifts by them) and their tokens join the image ([16 text; 16 reference; 16 image]); the perturbed rows
    cover both, and the prediction equals the explicit-mask model's. Without the shift the wrong call is perturbed."""
    m = _build(comfyui, "omnigen2")
    mod = comfyui.module_of("TrainFreePAG")
    dm = m.model.diffusion_model
    x, ref = _latent(m.tiny, "omnigen2"), _latent(m.tiny, "omnigen2", seed=7)
    counts = mod.pag_omnigen2.layer_counts(dm)
    opts = mod.perturbed_options(m.model_options, "omnigen2", [("block", 1, None)], counts=counts)
    seen = _spy(monkeypatch, mod)
    ours = _apply(m, "omnigen2", x, opts["transformer_options"], ref_latents=[ref])
    assert seen == [(1, 48, (16, 48))]
    monkeypatch.undo()
    _manual(monkeypatch, dm, "omnigen2", "block", 1, img=32)
    manual = _apply(m, "omnigen2", x, m.model_options["transformer_options"], ref_latents=[ref])
    monkeypatch.undo()
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-5 * float(manual.abs().max()))
    unshifted = (counts[0] + counts[1], 0, counts[2], counts[3])    # as if the reference refiner always ran
    opts = mod.perturbed_options(m.model_options, "omnigen2", [("block", 1, None)], counts=unshifted)
    with pytest.raises(RuntimeError, match=r"on OmniGen2: the network made 4 attention calls, 5 expected"):
        _apply(m, "omnigen2", x, opts["transformer_options"])


def test_omnigen2_stops_on_another_call_count_or_layout(comfyui, monkeypatch):
    m = _build(comfyui, "omnigen2")
    mod = comfyui.module_of("TrainFreePAG")
    first, ref, main, patch = mod.pag_omnigen2.layer_counts(m.model.diffusion_model)
    more = (first, ref, main + 1, patch)
    opts = mod.perturbed_options(m.model_options, "omnigen2", [("block", 0, None)], counts=more)
    with pytest.raises(RuntimeError, match=r"PAG \(TrainFree\) on OmniGen2: the network made 4 attention calls, 5 "
                                           r"expected"):
        _apply(m, "omnigen2", _latent(m.tiny, "omnigen2"), opts["transformer_options"])
    monkeypatch.setattr(mod.pag_omnigen2, "image_tokens", lambda x, refs, p: 20)
    opts = mod.perturbed_options(m.model_options, "omnigen2", [("block", 0, None)], counts=(first, ref, main, patch))
    with pytest.raises(RuntimeError, match="an attention call over 32 tokens, 16 text and 20 image tokens expected"):
        _apply(m, "omnigen2", _latent(m.tiny, "omnigen2"), opts["transformer_options"])


@pytest.mark.parametrize("arch", ["hidream", "cosmos_predict2", "pixart"])
def test_another_attention_count_stops_with_a_clear_error(comfyui, arch):
    m = _build(comfyui, arch)
    mod = comfyui.module_of("TrainFreePAG")
    calls, numbers, patch = mod.pag_counted.layout(m.model.diffusion_model, arch)
    opts = mod.perturbed_options(m.model_options, arch, [(mod.pag_counted.KINDS_OF[arch][0], 0, None)],
                                 counts=(calls + 1, numbers, patch))
    name = mod.pag_counted.NAMES[arch]
    with pytest.raises(RuntimeError, match=rf"PAG \(TrainFree\) on {name}: the network made {calls} attention calls, "
                                           rf"{calls + 1} expected"):
        _apply(m, arch, _latent(m.tiny, arch), opts["transformer_options"])


def test_hidream_stops_where_the_streams_are_joined_differently(comfyui, monkeypatch):
    """Were the text longer than HiDream 0.3.64's [T5; Llama; Llama], the image rows could not be found: a clear
    error, not a silently wrong guidance."""
    m = _build(comfyui, "hidream")
    mod = comfyui.module_of("TrainFreePAG")
    monkeypatch.setattr(mod.pag_counted, "_hidream_tokens", lambda *a: (16, 47))
    opts = mod.perturbed_options(m.model_options, "hidream", [("double", 0, None)],
                                 counts=mod.pag_counted.layout(m.model.diffusion_model, "hidream"))
    with pytest.raises(RuntimeError, match="an attention call over 64 tokens, 16 image and 47 text tokens expected"):
        _apply(m, "hidream", _latent(m.tiny, "hidream"), opts["transformer_options"])


def _sampler(m, arch, steps):
    """Sampling of the tiny ``arch`` model's prompts from one noise, with CFG 3: ``sample(model)``."""
    import comfy.sample

    pos, neg = m.tiny.conditioning(arch, 1), m.tiny.conditioning(arch, 2)
    noise = _latent(m.tiny, arch, seed=4)
    return lambda model: comfy.sample.sample(model, noise, steps, 3.0, "euler", "normal", pos, neg,
                                             torch.zeros_like(noise), seed=4, disable_pbar=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_zero_is_bit_identical_and_pag_moves_the_sample(comfyui, arch):
    m = _build(comfyui, arch)
    sample = _sampler(m, arch, 3)
    plain = sample(m)
    assert torch.equal(sample(_pag(comfyui, m, 0.0)), plain)
    moved = sample(_pag(comfyui, m, 3.0))
    assert (moved - plain).abs().max() > 1e-3 * plain.abs().max()


@pytest.mark.parametrize("arch", ["hidream", "cosmos_predict2", "lumina2"])
def test_the_call_count_beside_core_easycache(comfyui, caplog, arch):
    """Core's EasyCache (a DIFFUSION_MODEL wrapper too, outside the perturbed pass's numbering) skips whole forwards:
    the numbering sees only the forwards that run, so the run ends normally with steps skipped, and PAG still acts."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    m = _build(comfyui, arch)
    sample = _sampler(m, arch, 10)
    with caplog.at_level(logging.INFO):
        cached = sample(EasyCacheNode.execute(_pag(comfyui, m, 3.0), 0.2, 0.0, 1.0, False)[0])
    skipped = [int(n) for n in re.findall(r"EasyCache - skipped (\d+)/10 steps", caplog.text)]
    assert skipped and skipped[-1] > 0
    plain = sample(EasyCacheNode.execute(m, 0.2, 0.0, 1.0, False)[0])
    assert torch.isfinite(cached).all() and (cached - plain).abs().max() > 1e-3 * plain.abs().max()
