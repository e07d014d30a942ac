"""TrainFreeNASA on Lumina Image 2.0 (NextDiT) and OmniGen2, whose network follows it (a wrapper, shifted rotary
positions and an attention override numbering each forward's calls, nodes/nasa_lumina.py, nodes/nasa_omnigen2.py;
the family-independent checks: test_nasa_node.py): the negative rides along as its own caption (OmniGen2: in an edit
too), PAG's call numbering inside NASA's split in either order, two NASA nodes, clear stops for padded prompts and
another network layout."""
import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import pag_inside_nasa_in_either_order
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny
from probes import perturbed_calls

ARCHS = ("lumina2", "omnigen2")


def _cond(t, **extra):
    return [[t, {"attention_mask": torch.ones(t.shape[0], t.shape[1], dtype=torch.long), **extra}]]


def _negative(tiny, arch, tokens, seed=2, **extra):
    t = tiny.conditioning(arch, seed)[0][0]
    return _cond(torch.cat([t, t.flip(1)], 1)[:, :tokens], **extra)


def _streams(model, cond, noise):
    """The caption after the context refiner and the joint sequence after the first main layer, in a one-step cfg-1
    sample of ``cond`` (neither network calls block patches, so forward hooks read them)."""
    seen = {}
    dm = model.model.diffusion_model
    hooks = [dm.context_refiner[-1].register_forward_hook(lambda m, i, o: seen.setdefault("caption", o.clone())),
             dm.layers[0].register_forward_hook(lambda m, i, o: seen.setdefault("joint", o.clone()))]
    try:
        _sample(model, cond, cond, noise, steps=1)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _reference():
    return [torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(5))]


@pytest.mark.parametrize("arch,edit", [("lumina2", False), ("omnigen2", False), ("omnigen2", True)])
@pytest.mark.parametrize("neg_tokens", [16, 9, 27])
def test_the_negative_rides_along_as_its_own_caption(comfyui, arch, edit, neg_tokens):
    """At a vanishing alpha, with a 16-token prompt: after the context refiner the caption is [the prompt's refined
    tokens; the negative's], each as its own forward refines it; after the first main layer the prompt's tokens and
    the image tokens (OmniGen2 edit: a reference image's 24 tokens, then the 16 of the latent) are what the prompt's
    own forward computes and the negative's tokens what the negative's own forward computes (their rotary positions
    differ from that forward's by one constant per axis, which a rotary table does not see; the image stream is the
    same in both forwards before that layer). Negatives shorter and longer than the prompt check the positions; the
    prompt's parts are exact, the negative's to float32 rounding of the rotation."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    extra = {"reference_latents": _reference()} if edit else {}
    pos = _cond(tiny.conditioning(arch, 1)[0][0], **extra)
    neg, noise = _negative(tiny, arch, neg_tokens, **extra), _noise(arch)
    got = _streams(_nasa(comfyui, base, neg, 1e-7), pos, noise)
    want_pos, want_neg = _streams(base, pos, noise), _streams(base, neg, noise)
    images = 16 + (24 if edit else 0)
    assert got["caption"].shape[1] == 16 + neg_tokens and got["joint"].shape[1] == 16 + neg_tokens + images
    assert torch.equal(got["caption"][:, :16], want_pos["caption"])
    scale = float(want_neg["caption"].abs().max())
    torch.testing.assert_close(got["caption"][:, 16:], want_neg["caption"], rtol=0, atol=1e-6 * scale)
    joint, scale = got["joint"], float(want_pos["joint"].abs().max())
    assert torch.equal(joint[:, :16], want_pos["joint"][:, :16])
    torch.testing.assert_close(joint[:, 16 + neg_tokens:], want_pos["joint"][:, 16:], rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(joint[:, 16:16 + neg_tokens], want_neg["joint"][:, :neg_tokens], rtol=0,
                               atol=1e-6 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_pag_numbers_the_prompts_calls_inside_nasas_split_in_either_order(comfyui, monkeypatch, arch):
    """PAG on these networks numbers their attention calls; NASA splits every one of them (the negative's part marked
    as its own) and lengthens the caption by the negative's 9 tokens. With both, in either order, PAG perturbs one
    call per chosen layer and forward, with the image rows right after the prompt's 16 tokens; at a vanishing alpha
    the pair gives PAG's own result, and at alpha 0.5 both orders give the same sample."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    seen = perturbed_calls(comfyui, monkeypatch, arch)
    pos, neg, noise = tiny.conditioning(arch, 1), _negative(tiny, arch, 9), _noise(arch)

    def pag(model):
        return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, 2.0, "block.1", 0.0, 1.0)[0]
    pag_inside_nasa_in_either_order(comfyui, base, neg, pos, noise, pag, seen, [(32, (16, 32))] * 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_nasa_nodes_each_see_their_own_negative(comfyui, arch):
    """Two chained NASA nodes (negatives of 9 and 27 tokens): at vanishing alphas the first layer's joint sequence is
    [prompt; first node's negative; second node's negative; image], each part what its own forward computes."""
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    pos, noise = tiny.conditioning(arch, 1), _noise(arch)
    first, second = _negative(tiny, arch, 9), _negative(tiny, arch, 27, seed=3)
    got = _streams(_nasa(comfyui, _nasa(comfyui, base, first, 1e-7), second, 1e-7), pos, noise)["joint"]
    want = [_streams(base, c, noise)["joint"] for c in (pos, first, second)]
    scale = float(want[0].abs().max())
    assert got.shape[1] == 16 + 9 + 27 + 16
    for part, (start, n) in zip(want, ((0, 16), (16, 9), (25, 27))):
        torch.testing.assert_close(got[:, start:start + n], part[:, :n], rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(got[:, 52:], want[0][:, 16:], rtol=0, atol=1e-6 * scale)
    moved = _sample(_nasa(comfyui, _nasa(comfyui, base, first, 0.5), second, 0.5), pos, pos, noise, steps=2)
    one = _sample(_nasa(comfyui, base, first, 0.5), pos, pos, noise, steps=2)
    assert torch.isfinite(moved).all() and (moved - one).abs().max() > 1e-3 * one.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_prompts_and_another_network_layout_stop_with_clear_errors(comfyui, monkeypatch, arch):
    tiny = _tiny(comfyui)
    base = tiny.build(arch)
    name = {"lumina2": "Lumina 2", "omnigen2": "OmniGen2"}[arch]
    pos, neg, noise = tiny.conditioning(arch, 1), tiny.conditioning(arch, 2), _noise(arch)
    padded = torch.tensor([[1] * 10 + [0] * 6])
    with pytest.raises(ValueError, match=r"the negative's conditioning carries padding .* on Lumina 2 and OmniGen2"):
        _nasa(comfyui, base, [[neg[0][0], {"attention_mask": padded}]])
    with pytest.raises(RuntimeError, match=rf"on {name}: the prompt's conditioning carries padding"):
        _sample(_nasa(comfyui, base, neg), [[pos[0][0], {"attention_mask": padded}]], pos, noise, steps=1)
    nasa_mod = comfyui.module_of("TrainFreeNASA")
    module = nasa_mod.nasa_lumina if arch == "lumina2" else nasa_mod.nasa_omnigen2
    real = module.layer_counts

    def changed(main=0, context=0):
        monkeypatch.setattr(module, "layer_counts", lambda dm: (lambda c: (c[0] + context, *c[1:-2], c[-2] + main,
                                                                           c[-1]))(real(dm)) if arch == "omnigen2"
                            else (lambda c: (c[0] + context, c[1], c[2] + main))(real(dm)))
    changed(main=1)
    with pytest.raises(RuntimeError, match=rf"on {name}: the network made 4 attention calls, 5 expected \(1 context "
                                           r"refiner, 1 image refiner and 3 main layers\)"):
        _sample(_nasa(comfyui, base, neg), pos, pos, noise, steps=1)
    changed(context=1, main=-1)
    with pytest.raises(RuntimeError, match=r"attention call 2 is over 16 tokens where 32 were expected \(16 \+ 16 "
                                           r"caption tokens\)"):
        _sample(_nasa(comfyui, base, neg), pos, pos, noise, steps=1)
