"""TrainFreeNASA on Lumina Image 2.0 (NextDiT: a DIFFUSION_MODEL wrapper, shifted rotary positions and an attention
override numbering each forward's calls, nodes/nasa_lumina.py; the family-independent checks: test_nasa_node.py):
the negative rides along as its own caption, PAG's call numbering inside NASA's split in either order, two NASA nodes,
clear stops for padded prompts and another network layout."""
import pytest
import torch
from nasa_cases import nasa as _nasa
from nasa_cases import noise as _noise
from nasa_cases import sample as _sample
from nasa_cases import tiny as _tiny


def _cond(t):
    return [[t, {"attention_mask": torch.ones(t.shape[0], t.shape[1], dtype=torch.long)}]]


def _negative(tiny, tokens, seed=2):
    t = tiny.conditioning("lumina2", seed)[0][0]
    return _cond(torch.cat([t, t.flip(1)], 1)[:, :tokens])


def _streams(model, cond, noise):
    """The caption after the context refiner and the joint sequence after the first main layer, in a one-step cfg-1
    sample of ``cond`` (NextDiT calls no block patches, so forward hooks read them)."""
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


@pytest.mark.parametrize("neg_tokens", [16, 9, 27])
def test_the_negative_rides_along_as_its_own_caption(comfyui, neg_tokens):
    """At a vanishing alpha, with a 16-token prompt: after the context refiner the caption is [the prompt's refined
    tokens; the negative's], each as its own forward refines it; after the first main layer the prompt's tokens and
    the 16 image tokens are what the prompt's own forward computes and the negative's tokens what the negative's own
    forward computes (their rotary positions differ from that forward's by one constant, which a rotary table does
    not see; the image stream is the same in both forwards before that layer). Negatives shorter and longer than the
    prompt check the positions; the prompt's parts are exact, the negative's to float32 rounding of the rotation."""
    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    pos, neg, noise = tiny.conditioning("lumina2", 1), _negative(tiny, neg_tokens), _noise("lumina2")
    got = _streams(_nasa(comfyui, base, neg, 1e-7), pos, noise)
    want_pos, want_neg = _streams(base, pos, noise), _streams(base, neg, noise)
    assert got["caption"].shape[1] == 16 + neg_tokens and got["joint"].shape[1] == 16 + neg_tokens + 16
    assert torch.equal(got["caption"][:, :16], want_pos["caption"])
    scale = float(want_neg["caption"].abs().max())
    torch.testing.assert_close(got["caption"][:, 16:], want_neg["caption"], rtol=0, atol=1e-6 * scale)
    joint, scale = got["joint"], float(want_pos["joint"].abs().max())
    assert torch.equal(joint[:, :16], want_pos["joint"][:, :16])
    torch.testing.assert_close(joint[:, 16 + neg_tokens:], want_pos["joint"][:, 16:], rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(joint[:, 16:16 + neg_tokens], want_neg["joint"][:, :neg_tokens], rtol=0,
                               atol=1e-6 * scale)


def test_pag_numbers_the_prompts_calls_inside_nasas_split_in_either_order(comfyui, monkeypatch):
    """PAG on Lumina 2 numbers the network's attention calls; NASA splits every one of them (the negative's part
    marked as its own) and lengthens the caption by the negative's 9 tokens. With both, in either order, PAG perturbs
    one call per chosen layer and forward, with the image rows right after the prompt's 16 tokens; at a vanishing alpha
    the pair gives PAG's own result, and at alpha 0.5 both orders give the same sample."""
    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    mod = comfyui.module_of("TrainFreePAG")
    seen, real = [], mod.pag_lumina.pag_math.joint_identity_attention

    def spy(q, k, v, start, end, mask=None, **kw):
        seen.append((q.shape[2], start, end))
        return real(q, k, v, start, end, mask=mask, **kw)
    monkeypatch.setattr(mod.pag_lumina.pag_math, "joint_identity_attention", spy)
    pos, neg, noise = tiny.conditioning("lumina2", 1), _negative(tiny, 9), _noise("lumina2")

    def pag(model):
        return comfyui.nodes.NODE_CLASS_MAPPINGS["TrainFreePAG"]().patch(model, 2.0, "block.1", 0.0, 1.0)[0]
    pag_alone = _sample(pag(base), pos, pos, noise, steps=2)
    assert seen == [(32, 16, 32)] * 2
    results = {}
    for order in ("nasa first", "pag first"):
        for alpha in (1e-7, 0.5):
            seen.clear()
            model = pag(_nasa(comfyui, base, neg, alpha)) if order == "nasa first" else \
                _nasa(comfyui, pag(base), neg, alpha)
            results[order, alpha] = _sample(model, pos, pos, noise, steps=2)
            assert seen == [(32, 16, 32)] * 2, (order, alpha)
        scale = float(pag_alone.abs().max())
        torch.testing.assert_close(results[order, 1e-7], pag_alone, rtol=0, atol=1e-5 * scale)
        assert (results[order, 0.5] - pag_alone).abs().max() > 1e-3 * scale
    torch.testing.assert_close(results["nasa first", 0.5], results["pag first", 0.5], rtol=0, atol=1e-6)


def test_two_nasa_nodes_each_see_their_own_negative(comfyui):
    """Two chained NASA nodes (negatives of 9 and 27 tokens): at vanishing alphas the first layer's joint sequence is
    [prompt; first node's negative; second node's negative; image], each part what its own forward computes."""
    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    pos, noise = tiny.conditioning("lumina2", 1), _noise("lumina2")
    first, second = _negative(tiny, 9), _negative(tiny, 27, seed=3)
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


def test_padded_prompts_and_another_network_layout_stop_with_clear_errors(comfyui, monkeypatch):
    tiny = _tiny(comfyui)
    base = tiny.build("lumina2")
    pos, neg, noise = tiny.conditioning("lumina2", 1), tiny.conditioning("lumina2", 2), _noise("lumina2")
    padded = torch.tensor([[1] * 10 + [0] * 6])
    with pytest.raises(ValueError, match=r"the negative's Lumina 2 conditioning carries padding"):
        _nasa(comfyui, base, [[neg[0][0], {"attention_mask": padded}]])
    with pytest.raises(RuntimeError, match=r"on Lumina 2: the prompt's conditioning carries padding"):
        _sample(_nasa(comfyui, base, neg), [[pos[0][0], {"attention_mask": padded}]], pos, noise, steps=1)
    lumina = comfyui.module_of("TrainFreeNASA").nasa_lumina
    real = lumina.layer_counts
    monkeypatch.setattr(lumina, "layer_counts", lambda dm: (lambda c: (c[0], c[1], c[2] + 1))(real(dm)))
    with pytest.raises(RuntimeError, match=r"on Lumina 2: the network made 4 attention calls, 5 expected \(1 context "
                                           r"refiner, 1 noise refiner and 3 main layers\)"):
        _sample(_nasa(comfyui, base, neg), pos, pos, noise, steps=1)
    monkeypatch.setattr(lumina, "layer_counts", lambda dm: (lambda c: (c[0] + 1, c[1], c[2] - 1))(real(dm)))
    with pytest.raises(RuntimeError, match=r"attention call 2 is over 16 tokens where 32 were expected \(16 \+ 16 "
                                           r"caption tokens\)"):
        _sample(_nasa(comfyui, base, neg), pos, pos, noise, steps=1)
