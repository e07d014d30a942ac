"""NASA math: Z+ - alpha Z-, conditional rows only, and the joint-attention variant (negative text tokens
carried along but invisible to the positive stream)."""
import math

import pytest
import torch

from trainfree.guidance import nasa


def _attn(q, k, v, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s if mask is None else s + mask, -1) @ v


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_steer_and_rows():
    zp, zn = _rand(4, 5, 8), _rand(4, 5, 8, seed=1)
    assert torch.equal(nasa.steer(zp, zn, 0.3), zp - 0.3 * zn)
    assert nasa.cond_rows([0, 1], 4).tolist() == [True, True, False, False]
    assert nasa.cond_rows([1, 0, 0], 3).tolist() == [False, True, True]
    assert nasa.cond_rows(None, 3).tolist() == [True] * 3
    with pytest.raises(ValueError):
        nasa.cond_rows([0, 1], 3)
    rows = torch.tensor([False, True, False, True])
    out = nasa.steer_rows(zp, rows, zn[rows], 0.5)
    assert torch.equal(out[~rows], zp[~rows]) and torch.equal(out[rows], zp[rows] - 0.5 * zn[rows])


def test_cross_attention_formula_alpha_zero_and_negative_equal_positive():
    q, kp, vp = _rand(4, 6, 8), _rand(4, 5, 8, seed=1), _rand(4, 5, 8, seed=2)
    kn, vn = _rand(1, 3, 8, seed=3), _rand(1, 3, 8, seed=4)
    rows = torch.tensor([True, True, False, False])              # [cond x2, uncond x2]
    out = nasa.cross_nasa_attention(q, kp, vp, kn, vn, 0.2, rows, _attn)
    ref_pos = _attn(q, kp, vp)
    assert torch.equal(out[2:], ref_pos[2:])                     # unconditional rows untouched
    torch.testing.assert_close(out[:2], ref_pos[:2] - 0.2 * _attn(q[:2], kn.expand(2, 3, 8), vn.expand(2, 3, 8)),
                               rtol=0, atol=1e-14)
    assert torch.equal(nasa.cross_nasa_attention(q, kp, vp, kn, vn, 0.0, rows, _attn), ref_pos)
    same = nasa.cross_nasa_attention(q, kp, vp, kp, vp, 0.25, torch.ones(4, dtype=torch.bool), _attn)
    torch.testing.assert_close(same, 0.75 * ref_pos, rtol=0, atol=1e-14)    # negative = positive: (1 - alpha) Z+


def test_cross_attention_uses_the_previous_replace_for_z_plus():
    q, kp, vp = _rand(2, 6, 8), _rand(2, 5, 8, seed=1), _rand(2, 5, 8, seed=2)
    kn, vn = _rand(2, 3, 8, seed=3), _rand(2, 3, 8, seed=4)
    rows = torch.ones(2, dtype=torch.bool)
    out = nasa.cross_nasa_attention(q, kp, vp, kn, vn, 0.5, rows, _attn, attend_pos=lambda q, k, v: 2 * _attn(q, k, v))
    torch.testing.assert_close(out, 2 * _attn(q, kp, vp) - 0.5 * _attn(q, kn, vn), rtol=0, atol=1e-14)


def test_joint_attention_keeps_the_positive_stream_blind_to_the_negative_tokens():
    tp, tn, ni = 3, 2, 5
    q, k, v = (_rand(2, 2, tp + tn + ni, 4, seed=s) for s in range(3))
    rows = torch.tensor([True, False])
    out = nasa.joint_nasa_attention(q, k, v, tp, tn, 0.4, rows, _attn)
    keep = list(range(tp)) + list(range(tp + tn, tp + tn + ni))
    plain = _attn(q[:, :, keep], k[:, :, keep], v[:, :, keep])             # the sequence without negative tokens
    assert torch.equal(out[:, :, :tp], plain[:, :, :tp])                   # positive text rows: exactly unchanged
    assert torch.equal(out[1:, :, tp + tn:], plain[1:, :, tp:])            # image rows of an unselected row
    neg_img = _attn(q[:1, :, tp + tn:], k[:1, :, tp:tp + tn], v[:1, :, tp:tp + tn])
    torch.testing.assert_close(out[:1, :, tp + tn:], plain[:1, :, tp:] - 0.4 * neg_img, rtol=0, atol=1e-14)
    nk = list(range(tp, tp + tn)) + list(range(tp + tn, tp + tn + ni))
    torch.testing.assert_close(out[:, :, tp:tp + tn], _attn(q[:, :, tp:tp + tn], k[:, :, nk], v[:, :, nk]),
                               rtol=0, atol=1e-14)                         # negative rows: [neg text; image]
    zero = nasa.joint_nasa_attention(q, k, v, tp, tn, 0.0, rows, _attn)
    assert torch.equal(zero[:, :, keep], plain)
    with pytest.raises(ValueError):
        nasa.joint_nasa_attention(q, k, v, 8, 4, 0.4, rows, _attn)


def test_joint_attention_image_first_with_a_padding_mask():
    """HunyuanVideo's order [image; positive text; negative text], its prompts' padding masks over the keys: every
    part equals the attention a sequence without the other prompt's tokens computes, with the mask cut to its keys
    (an additive -1e9 on the masked keys of each prompt)."""
    ni, tp, tn = 5, 3, 4
    q, k, v = (_rand(2, 2, ni + tp + tn, 4, seed=s) for s in range(3))
    mask = torch.zeros(1, 1, ni + tp + tn, dtype=torch.float64)
    mask[..., ni + tp - 1] = mask[..., -2:] = -1e9          # the last positive and the last two negative tokens
    rows = torch.tensor([False, True])
    out = nasa.joint_nasa_attention(q, k, v, tp, tn, 0.3, rows, _attn, image_first=ni, key_mask=mask)
    pos, neg = list(range(ni + tp)), list(range(ni + tp, ni + tp + tn))
    plain = _attn(q[:, :, pos], k[:, :, pos], v[:, :, pos], mask[..., pos])
    assert torch.equal(out[:, :, ni:ni + tp], plain[:, :, ni:])                   # positive text rows
    assert torch.equal(out[:1, :, :ni], plain[:1, :, :ni])                        # image rows, unselected row
    z_neg = _attn(q[1:, :, :ni], k[1:, :, neg], v[1:, :, neg], mask[..., neg])
    torch.testing.assert_close(out[1:, :, :ni], plain[1:, :, :ni] - 0.3 * z_neg, rtol=0, atol=1e-14)
    nk = neg + list(range(ni))
    torch.testing.assert_close(out[:, :, ni + tp:], _attn(q[:, :, neg], k[:, :, nk], v[:, :, nk], mask[..., nk]),
                               rtol=0, atol=1e-14)                                 # negative rows: [neg text; image]
    unmasked = nasa.joint_nasa_attention(q, k, v, tp, tn, 0.3, rows, _attn, image_first=ni)
    assert (unmasked - out).abs().max() > 1e-3                                    # the mask matters
    per_row = mask.expand(2, 1, 1, -1).clone()                                     # a mask per batch row
    torch.testing.assert_close(nasa.joint_nasa_attention(q, k, v, tp, tn, 0.3, rows, _attn, ni, per_row), out,
                               rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="with 5 image tokens"):
        nasa.joint_nasa_attention(q, k, v, tp, tn + 1, 0.3, rows, _attn, image_first=ni)
    with pytest.raises(ValueError, match="not a key"):
        nasa.joint_nasa_attention(q, k, v, tp, tn, 0.3, rows, _attn, ni, torch.zeros(1, 1, 12, 12))


def test_joint_attention_hands_the_ordinary_attention_to_attend_pos():
    """``attend_pos`` (HiDream: the call down the override chain as the network's own) makes exactly one call, the
    ordinary joint attention over [image; positive text]; ``attend`` the two over the negative text."""
    ni, tp, tn = 5, 3, 4
    q, k, v = (_rand(2, 2, ni + tp + tn, 4, seed=s) for s in range(3))
    rows = torch.tensor([True, True])
    calls = {"pos": [], "neg": []}

    def tagged(tag, scale):
        def attend(q_, k_, v_, m_):
            calls[tag].append((q_.shape[2], k_.shape[2]))
            return scale * _attn(q_, k_, v_, m_)
        return attend
    out = nasa.joint_nasa_attention(q, k, v, tp, tn, 0.3, rows, tagged("neg", 1.0), image_first=ni,
                                    attend_pos=tagged("pos", 2.0))
    assert calls == {"pos": [(ni + tp, ni + tp)], "neg": [(tn, tn + ni), (ni, tn)]}
    ref = nasa.joint_nasa_attention(q, k, v, tp, tn, 0.3, rows, _attn, image_first=ni)
    pos = list(range(ni + tp))
    plain = _attn(q[:, :, pos], k[:, :, pos], v[:, :, pos])
    torch.testing.assert_close(out[:, :, :ni], ref[:, :, :ni] + plain[:, :, :ni], rtol=0, atol=1e-13)
    torch.testing.assert_close(out[:, :, ni:ni + tp], 2 * plain[:, :, ni:], rtol=0, atol=1e-13)
    assert torch.equal(out[:, :, ni + tp:], ref[:, :, ni + tp:])


def test_steering_lowers_the_alignment_with_the_negative_features():
    """What 'negative-away' means in feature space: <Z_NASA, Z-> = <Z+, Z-> - alpha |Z-|^2 per token."""
    q, kp, vp = _rand(1, 16, 8), _rand(1, 5, 8, seed=1), _rand(1, 5, 8, seed=2)
    kn, vn = _rand(1, 5, 8, seed=3), _rand(1, 5, 8, seed=4)
    zp, zn = _attn(q, kp, vp), _attn(q, kn, vn)
    out = nasa.cross_nasa_attention(q, kp, vp, kn, vn, 0.3, torch.ones(1, dtype=torch.bool), _attn)
    torch.testing.assert_close((out * zn).sum(-1), (zp * zn).sum(-1) - 0.3 * (zn * zn).sum(-1), rtol=0, atol=1e-13)
    assert bool(((out * zn).sum(-1) < (zp * zn).sum(-1)).all())
