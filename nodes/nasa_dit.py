"""NASA's DiT patches (the node and the UNet path: nodes/nasa.py).

SD3: the first joint block's patch appends the negative prompt, through the model's own ``context_embedder``, to
the text stream as extra tokens, and a ``patches_replace["dit"]`` patch on every block (chaining earlier ones) sets
an attention override for that block that keeps the positive stream blind to those tokens (see guidance/nasa.py).
Flux, Chroma and Qwen-Image: the same (through ``txt_in``; Qwen: ``txt_norm`` then ``txt_in``), and every block's
patch widens the rotary table it is handed, which the model computed for the positive text alone: Flux's and
Chroma's text positions are all 0, Qwen's count up from a start that depends on the latent size (read by a
DIFFUSION_MODEL wrapper), and the negative gets the positions a negative-prompt pass would give it. AuraFlow: as
Flux, the negative (through ``cond_seq_linear``) after its own register tokens, as its own pass would have them; no
rotary table to widen.
Several NASA nodes chain: each appends its tokens after those of the nodes applied after it (their patches run
first), widens the table at its own tokens' place, and its override hands the sequence without its own tokens to
the next one, so each sees its own layout.
Wan (text- and image-to-video, camera control, HuMo, Animate; 2.1's image cross-attention comes first and is left
alone unless, run without CLIP-vision tokens, it attends the prompt; HuMo's audio attention is left alone; VACE's
control blocks, run outside the block patches, keep the positive prompt): each block's patch appends the negative
(through ``text_embedding``) to the block's context;
the block's own cross-attention projects both, and its override splits the keys. LTX-Video: the same (through
``caption_projection``), and the negative's padding mask is appended to the cross-attention mask, which the
override splits with the keys. HunyuanVideo (and HunyuanImage 2.1): as Chroma, but the negative goes through the
timestep-conditioned token refiner ``txt_in`` (timesteps read by a DIFFUSION_MODEL wrapper), the joint sequence is
[image; positive text; negative text], and each block's patch widens the prompts' padding mask with the rotary table;
HunyuanImage 2.1's glyph tokens (byT5 features of quoted text) follow each prompt's text, through ``byt5_in``.

``window`` is the node's _Window: its ``rows(transformer_options, batch, device)`` says which rows to steer.
"""
from __future__ import annotations

import torch

import comfy.ldm.wan.model as wan_model
import comfy.patcher_extension as pe

from ..guidance import nasa as nasa_math
from . import attention_chain, dit_layout
from .attention_chain import chained as _call


def _to_batch(t, batch):
    """A negative's rows for a forward of ``batch`` rows: batch 1 for all, else cycled (item i of each chunk)."""
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t[torch.arange(batch, device=t.device) % t.shape[0]]


def _joint_block_patch(prev, neg_len, box, alpha, window, extend=None, widen=None, image_first=False):
    """Flux / Chroma double and single blocks, SD3 and Qwen-Image joint blocks: the block's first attention call is
    the joint one over [positive text; negative text; image] (HunyuanVideo, ``image_first``: [image; positive text;
    negative text], with its prompts' padding mask over the keys); later calls (SD3.5 MMDiT-X image self-attention)
    pass through. ``extend(args)`` (first block) appends the negative tokens to the text stream; ``widen(args)``
    gives the rotary table rows (HunyuanVideo: and the mask) for them."""
    def patch(args, extra):
        if extend is not None:
            args = extend(args)
        if widen is not None:
            args = widen(args)
        to = dict(args["transformer_options"])
        earlier = to.get("optimized_attention_override")
        calls = [0]

        def override(func, *a, **kw):
            calls[0] += 1
            if calls[0] > 1:
                return _call(earlier, func, *a, **kw)
            mask = kw.pop("mask", a[4] if len(a) > 4 else None)
            if mask is not None and not image_first:
                raise RuntimeError("NASA (TrainFree) on joint attention does not support attention masks in the "
                                   "conditioning")
            q, k, v = a[:3]
            heads = a[3] if len(a) > 3 else kw.pop("heads")
            if not kw.get("skip_reshape", False):
                q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            want_heads_out = kw.get("skip_output_reshape", False)
            sub = dict(kw, skip_reshape=True, skip_output_reshape=True)
            rows = window.rows(to, q.shape[0], q.device)
            # [image; text before this node's negative; its negative] (what reaches it: later nodes' tokens are cut)
            n_img = q.shape[2] - box["t_pos"] - neg_len if image_first else None
            out = nasa_math.joint_nasa_attention(
                q, k, v, box["t_pos"], neg_len, alpha, rows,
                lambda q_, k_, v_, m_: _call(earlier, func, q_, k_, v_, heads, **dict(sub, mask=m_)), n_img, mask)
            if want_heads_out:
                return out
            b, h, n, d = out.shape
            return out.transpose(1, 2).reshape(b, n, h * d)

        to["optimized_attention_override"] = override
        new_args = dict(args, transformer_options=to)
        return prev(new_args, extra) if prev is not None else extra["original_block"](new_args)
    if extend is not None:   # for a block cache wrapped around this block: widen its input first, then the rest
        patch.extend_input, patch.after_extend = extend, _joint_block_patch(prev, neg_len, box, alpha, window,
                                                                            widen=widen, image_first=image_first)
    return patch


def _text_extend(embed, neg, box):
    """First block (SD3, Flux, Chroma, Qwen-Image): the negative, through the model's own text input layers
    ``embed``, appended to the text stream."""
    def extend(args):
        txt = args["txt"]
        box["t_pos"] = txt.shape[1]
        extra = _to_batch(embed(neg.get(txt.device, txt.dtype)), txt.shape[0])
        return dict(args, txt=torch.cat([txt, extra], dim=1))
    return extend


def _aura_text(dm, t):
    """AuraFlow's text stream for the prompt ``t``, as its forward makes it: its register tokens, then the prompt
    through ``cond_seq_linear``."""
    c = dm.cond_seq_linear(t)
    return torch.cat([dm.register_tokens.to(c).repeat(c.shape[0], 1, 1), c], dim=1)


def _pe_widen(seq_dim, rows_for, neg_len, box):
    """The block's rotary table with ``rows_for(pe, t_neg)`` inserted after the text before this node's negative,
    when the table is at least ``neg_len`` rows short of the block's sequence (double blocks: text + image; single:
    the joined stream; more than that: the tokens of NASA nodes applied before this one, which widen it next)."""
    def widen(args):
        pe = args.get("pe")
        if pe is None:
            return args
        n = args["img"].shape[1] + (args["txt"].shape[1] if "txt" in args else 0)
        have = pe.shape[seq_dim]
        if have == n:
            return args
        if have + neg_len > n:
            raise RuntimeError(f"NASA (TrainFree): a rotary table of {have} positions for a sequence of {n} tokens "
                               f"({neg_len} negative); another patch changed the token count")
        t = box["t_pos"]
        rows = rows_for(pe, neg_len).to(pe)
        return dict(args, pe=torch.cat([pe.narrow(seq_dim, 0, t), rows, pe.narrow(seq_dim, t, have - t)], seq_dim))
    return widen


def _zero_rows(pe, t_neg):
    """Flux and Chroma give every text token position 0 (txt_ids are zeros): the negative's rows repeat the first."""
    return pe.narrow(2, 0, 1).expand(*pe.shape[:2], t_neg, *pe.shape[3:])


def _qwen_start(box):
    """DIFFUSION_MODEL wrapper: Qwen-Image's first text position for this latent size (its _forward's txt_start)."""
    def wrapper(executor, x, *args, **kwargs):
        p = executor.class_obj.patch_size
        box["txt_start"] = round(max(((x.shape[-1] + p // 2) // p) // 2, ((x.shape[-2] + p // 2) // p) // 2))
        return executor(x, *args, **kwargs)
    return wrapper


def _qwen_rows(dm, box):
    """The negative's rows: positions txt_start, txt_start + 1, ... on all three axes, as the positive's."""
    def rows_for(pe, t_neg):
        start = box["txt_start"]
        ids = torch.arange(start, start + t_neg, device=pe.device).reshape(1, -1, 1).repeat(pe.shape[0], 1, 3)
        return dm.pe_embedder(ids).squeeze(1).unsqueeze(2)
    return rows_for


def _hunyuan_inputs(box):
    """DIFFUSION_MODEL wrapper (HunyuanVideo, HunyuanImage 2.1): the timesteps and model-level transformer_options of
    this forward, which the model's token refiner ``txt_in`` takes with the text."""
    def wrapper(executor, x, timestep, *args, **kwargs):
        box["timesteps"] = timestep
        box["to"] = kwargs.get("transformer_options", args[-1] if args and isinstance(args[-1], dict) else {})
        try:
            return executor(x, timestep, *args, **kwargs)
        finally:
            for key in ("timesteps", "to", "neg_add"):
                box.pop(key, None)
    return wrapper


def _padding(mask, dtype):
    """A prompt's attention mask (batch, tokens) as HunyuanVideo's forward makes it: additive; None if it masks
    nothing (its text encoder drops such masks too)."""
    if mask is None:
        return None
    if not torch.is_floating_point(mask):
        return None if bool(mask.all()) else (mask - 1).to(dtype) * torch.finfo(dtype).max
    return None if not bool(mask.any()) else mask.to(dtype)


def _hunyuan_extend(dm, neg, neg_mask, box, glyph=None):
    """First double block: the negative through the model's own token refiner ``txt_in`` (this forward's timesteps,
    the negative's padding mask, kept in ``box`` for this forward's blocks), then (HunyuanImage 2.1) its ``glyph``
    tokens (the byT5 features of quoted text) through ``byt5_in``, as the model's forward does for a prompt;
    appended to the text stream."""
    def extend(args):
        txt = args["txt"]
        b = txt.shape[0]
        box["t_pos"] = txt.shape[1]
        box["prefix"] = args["img"].shape[1] + txt.shape[1]      # image and text before this node's negative
        add = _padding(neg_mask, txt.dtype)
        add = None if add is None else _to_batch(add.to(txt.device), b)
        extra = dm.txt_in(_to_batch(neg.get(txt.device, txt.dtype), b), box["timesteps"], add,
                          transformer_options=box["to"])
        if glyph is not None:
            extra = torch.cat([extra, _to_batch(dm.byt5_in(glyph.to(txt.device, txt.dtype)), b)], dim=1)
            add = None if add is None else torch.cat([add, add.new_zeros(b, glyph.shape[1])], dim=1)
        box["neg_add"] = add
        return dict(args, txt=torch.cat([txt, extra], dim=1))
    return extend


def _hunyuan_widen(neg_len, box):
    """Every block's rotary table and key mask, which the model made for [image; positive text] (and NASA nodes
    applied after this one widened for their tokens), widened for this node's negative, which follows them: rotary
    rows as every text token's (position 0), mask: the negative's padding (as the first block made it)."""
    def widen(args):
        x, prefix = args["img"], box["prefix"]
        out, pe, mask = dict(args), args.get("pe"), args.get("attention_mask")
        if pe is not None:
            if pe.shape[2] != prefix:
                raise RuntimeError(f"NASA (TrainFree): a rotary table of {pe.shape[2]} positions where {prefix} image "
                                   "and text tokens precede the negative; another patch changed the token count")
            last = pe.narrow(2, pe.shape[2] - 1, 1)
            out["pe"] = torch.cat([pe, last.expand(*last.shape[:2], neg_len, *last.shape[3:])], 2)
        add = box["neg_add"]
        if mask is None and add is None:
            return out
        if mask is not None and mask.shape[-1] != prefix:
            raise RuntimeError(f"NASA (TrainFree): an attention mask over {mask.shape[-1]} tokens where {prefix} "
                               "precede the negative; another patch changed the token count")
        pos = mask.reshape(mask.shape[0], 1, -1) if mask is not None else x.new_zeros(1, 1, prefix)
        negp = x.new_zeros(1, 1, neg_len) if add is None else add.unsqueeze(1)
        rows = max(pos.shape[0], negp.shape[0])
        out["attention_mask"] = torch.cat([pos.expand(rows, 1, -1), negp.to(pos.dtype).expand(rows, 1, -1)], -1)
        return out
    return widen


def _wan_block_patch(prev, text_call, dm, neg, alpha, window):
    """Wan: append the embedded negative to the block's context; in the text cross-attention call split the keys
    into positive and negative parts (the module's own k / norm_k / v projected both). Wan 2.1 image-to-video run
    without CLIP-vision tokens hands its image branch the whole context (the prompt, through k_img / v_img): that
    call is steered too, as a negative-prompt pass would change both."""
    def patch(args, extra):
        ctx = args["txt"]
        neg_emb = _to_batch(dm.text_embedding(neg.get(ctx.device, ctx.dtype)), ctx.shape[0])
        t_neg = neg_emb.shape[1]
        total = ctx.shape[1] + t_neg
        to = dict(args["transformer_options"])
        earlier = to.get("optimized_attention_override")
        calls = [0]

        def override(func, *a, **kw):
            if attention_chain.is_own(kw):   # another NASA node's negative-prompt call: not one to count
                return _call(earlier, func, *a, **kw)
            calls[0] += 1
            q, k, v = a[:3]
            if calls[0] - 1 != text_call and not (calls[0] == 2 and text_call == 2 and k.shape[1] == total):
                return _call(earlier, func, *a, **kw)
            heads = a[3] if len(a) > 3 else kw.pop("heads")
            rows = window.rows(to, q.shape[0], q.device)

            def attend(q_, k_, v_):
                return _call(earlier, func, q_, k_, v_, heads, **kw)

            def attend_negative(q_, k_, v_):
                return _call(earlier, func, q_, k_, v_, heads, **attention_chain.own(kw))
            return nasa_math.cross_nasa_attention(q, k[:, :-t_neg], v[:, :-t_neg], k[rows][:, -t_neg:],
                                                  v[rows][:, -t_neg:], alpha, rows, attend_negative, attend)

        to["optimized_attention_override"] = override
        new_args = dict(args, txt=torch.cat([ctx, neg_emb], dim=1), transformer_options=to)
        return prev(new_args, extra) if prev is not None else extra["original_block"](new_args)
    return patch


def _additive(mask, dtype):
    """A 0/1 padding mask (batch, tokens) -> the additive (batch, 1, 1, tokens) form LTX-Video's attention takes."""
    if torch.is_floating_point(mask):
        return mask.to(dtype).reshape(mask.shape[0], 1, 1, -1)
    return (mask - 1).to(dtype).reshape(mask.shape[0], 1, 1, -1) * torch.finfo(dtype).max


def _ltxv_block_patch(prev, dm, neg, neg_mask, alpha, window):
    """LTX-Video: append the projected negative to the block's context and its padding mask (None: all real tokens)
    to the block's cross-attention mask; in the cross-attention call (the block's second) split keys and mask."""
    def patch(args, extra):
        ctx, mask = args["txt"], args.get("attention_mask")
        b = ctx.shape[0]
        neg_emb = _to_batch(dm.caption_projection(neg.get(ctx.device, ctx.dtype)), b)
        t_neg = neg_emb.shape[1]
        if mask is not None or neg_mask is not None:
            dtype = mask.dtype if mask is not None else ctx.dtype
            neg_add = (_to_batch(_additive(neg_mask.to(ctx.device), dtype), b) if neg_mask is not None
                       else torch.zeros(b, 1, 1, t_neg, dtype=dtype, device=ctx.device))
            pos_add = mask if mask is not None else torch.zeros(b, 1, 1, ctx.shape[1], dtype=dtype, device=ctx.device)
            mask = torch.cat([pos_add.expand(b, *pos_add.shape[1:]), neg_add], dim=-1)
        to = dict(args["transformer_options"])
        earlier = to.get("optimized_attention_override")
        calls = [0]

        def override(func, *a, **kw):
            calls[0] += 1
            if calls[0] != 2:
                return _call(earlier, func, *a, **kw)
            q, k, v = a[:3]
            heads = a[3] if len(a) > 3 else kw.pop("heads")
            m = kw.pop("mask", a[4] if len(a) > 4 else None)
            rows = window.rows(to, q.shape[0], q.device)

            def attend(mk):
                return lambda q_, k_, v_: _call(earlier, func, q_, k_, v_, heads, **dict(kw, mask=mk))
            m_pos = m[..., :-t_neg] if m is not None else None
            m_neg = m[rows][..., -t_neg:] if m is not None else None
            return nasa_math.cross_nasa_attention(q, k[:, :-t_neg], v[:, :-t_neg], k[rows][:, -t_neg:],
                                                  v[rows][:, -t_neg:], alpha, rows, attend(m_neg), attend(m_pos))

        to["optimized_attention_override"] = override
        new_args = dict(args, txt=torch.cat([ctx, neg_emb], dim=1), attention_mask=mask, transformer_options=to)
        return prev(new_args, extra) if prev is not None else extra["original_block"](new_args)
    return patch


def patch_dit(m, arch, dm, neg, negative, alpha, window, dit):
    """Install NASA's block patches on the clone ``m`` of a DiT of family ``arch`` (network ``dm``): ``neg`` the
    negative's device cache, ``negative`` its first CONDITIONING entry, ``dit`` the block patches already there."""
    if arch == "wan":
        text_call = 2 if isinstance(dm.blocks[0].cross_attn, wan_model.WanI2VCrossAttention) else 1
        for i in range(len(dm.blocks)):
            m.set_model_patch_replace(_wan_block_patch(dit.get(("double_block", i)), text_call, dm, neg, alpha,
                                                       window), "dit", "double_block", i)
        return
    if arch == "ltxv":
        pad = negative[1].get("attention_mask")
        if pad is not None and tuple(pad.shape) != tuple(negative[0].shape[:2]):
            raise ValueError(f"NASA: the negative's attention mask {tuple(pad.shape)} does not match its "
                             f"{tuple(negative[0].shape[:2])} tokens")
        for i in range(len(dm.transformer_blocks)):
            m.set_model_patch_replace(_ltxv_block_patch(dit.get(("double_block", i)), dm, neg, pad, alpha,
                                                        window), "dit", "double_block", i)
        return
    box, t_neg, widen = {}, negative[0].shape[1], None
    if arch == "hunyuan_video":
        pad = negative[1].get("attention_mask")
        if pad is not None and tuple(pad.shape) != tuple(negative[0].shape[:2]):
            raise ValueError(f"NASA: the negative's attention mask {tuple(pad.shape)} does not match its "
                             f"{tuple(negative[0].shape[:2])} tokens")
        glyph = negative[1].get("conditioning_byt5small") if getattr(dm, "byt5_in", None) is not None else None
        if glyph is not None:
            if glyph.ndim != 3 or glyph.shape[0] not in (1, negative[0].shape[0]):
                raise ValueError(f"NASA: the negative's glyph (byT5) features {tuple(glyph.shape)} do not match its "
                                 f"{tuple(negative[0].shape[:2])} tokens")
            t_neg += glyph.shape[1]
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "trainfree_nasa", _hunyuan_inputs(box))
        widen, extend = _hunyuan_widen(t_neg, box), _hunyuan_extend(dm, neg, pad, box, glyph)
        for kind, i in dit_layout.block_keys(dm):
            m.set_model_patch_replace(_joint_block_patch(dit.get((kind, i)), t_neg, box, alpha, window,
                                                         extend if (kind, i) == ("double_block", 0) else None, widen,
                                                         image_first=True), "dit", kind, i)
        return
    if arch in ("flux", "chroma", "auraflow"):
        blocks = dit_layout.block_keys(dm)
    else:
        blocks = [("double_block", i) for i in range(len(dm.transformer_blocks if arch == "qwen_image"
                                                         else dm.joint_blocks))]
    if arch in ("flux", "chroma"):
        widen = _pe_widen(2, _zero_rows, t_neg, box)
    elif arch == "qwen_image":
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "trainfree_nasa", _qwen_start(box))
        widen = _pe_widen(1, _qwen_rows(dm, box), t_neg, box)
    if arch == "auraflow":                          # the negative gets its own register tokens, as in its own pass
        t_neg += dm.register_tokens.shape[1]
    embed = {"sd3": lambda t: dm.context_embedder(t), "qwen_image": lambda t: dm.txt_in(dm.txt_norm(t)),
             "auraflow": lambda t: _aura_text(dm, t)}.get(arch, lambda t: dm.txt_in(t))   # Flux, Chroma
    for kind, i in blocks:
        extend = _text_extend(embed, neg, box) if (kind, i) == ("double_block", 0) else None
        m.set_model_patch_replace(_joint_block_patch(dit.get((kind, i)), t_neg, box, alpha, window, extend, widen),
                                  "dit", kind, i)
