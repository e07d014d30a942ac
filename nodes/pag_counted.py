"""PAG on HiDream-I1, Cosmos-Predict2 and PixArt-alpha / Sigma, whose forwards call no block patches in ComfyUI 0.3.64.

In the perturbed pass only, a DIFFUSION_MODEL wrapper numbers the attention calls of each forward and an attention
override perturbs those of the chosen blocks; the wrapper checks the count at the end of the forward and stops with a
clear error where another ComfyUI's network calls attention differently (``numbered``, which Lumina 2's PAG,
pag_lumina.py, uses too).

* HiDream-I1 (E1 too): one attention call per block, the double-stream blocks, then the single-stream ones. The image
  tokens come first in every call: [img; T5; Llama (last layer); Llama (this block's layer)] in both kinds, the
  single blocks carrying the text along in their one stream. Image rows see the text keys and their own key only,
  as on the other joint-attention DiTs. The image token count is read off the latent (with an edit model's
  ``image_cond`` joined on its width) and checked against the call's length minus the text tokens.
* Cosmos-Predict2: two calls per block, a self-attention over the video tokens, then a cross-attention to the
  text; the chosen blocks' self-attention returns V (the identity map), their cross-attention is left alone.
* PixArt: the same, counted around apply_model (its forward calls no DIFFUSION_MODEL wrapper); its attention calls
  get the forward's options from nodes/pixart_options.py, whose wrapper the perturbed pass gets too.
"""
from __future__ import annotations

import comfy.ldm.cosmos.predict2 as cosmos_model
import comfy.ldm.hidream.model as hidream_model
import comfy.patcher_extension as pe

from ..guidance import pag as pag_math
from . import attention_chain, dit_layout, pixart_options

KINDS_OF = {"hidream": ("double", "single"), "cosmos_predict2": ("block",), "pixart": ("block",)}
NAMES = {"hidream": "HiDream", "cosmos_predict2": "Cosmos-Predict2", "pixart": "PixArt"}


def architecture(dm) -> str | None:
    if isinstance(dm, hidream_model.HiDreamImageTransformer2DModel):
        return "hidream"
    if isinstance(dm, cosmos_model.MiniTrainDIT):
        return "cosmos_predict2"
    if pixart_options.is_pixart(dm):
        return "pixart"
    return None


def available_layers(dm, arch: str) -> list[tuple[str, int, None]]:
    if arch == "hidream":
        return [("double", i, None) for i in range(len(dm.double_stream_blocks))] + \
               [("single", i, None) for i in range(len(dm.single_stream_blocks))]
    return [("block", i, None) for i in range(len(dm.blocks))]


def layout(dm, arch: str) -> tuple:
    """What the perturbed pass needs to know of the network, read once when patching (the post-CFG function must
    not hold the model): (attention calls per forward, {layer: call number}, patch size)."""
    if arch == "hidream":
        doubles, singles = len(dm.double_stream_blocks), len(dm.single_stream_blocks)
        calls = {("double", i): i for i in range(doubles)}
        calls.update({("single", i): doubles + i for i in range(singles)})
        return doubles + singles, calls, dm.patch_size
    return 2 * len(dm.blocks), {("block", i): 2 * i for i in range(len(dm.blocks))}, None


def numbered(to, expected, chosen, on_forward, perturbed, mismatch, around=pe.WrappersMP.DIFFUSION_MODEL):
    """Install, in ``to`` (the perturbed pass's transformer_options, a copy), a wrapper (``around``: a
    DIFFUSION_MODEL one, or APPLY_MODEL for a network whose forward calls none) that numbers the attention calls of
    each forward and an override that hands the calls numbered in ``chosen`` to ``perturbed(state, *a, **kw)``; the
    others, and the calls another node marks as its own (attention_chain), go to any earlier override.
    ``on_forward(state, network, x, *args, **kwargs)`` fills the per-forward state from the forward's inputs (and
    may set ``state["shift"]``: calls this forward makes before the numbered ones, such as OmniGen2's
    reference-image refiner); ``mismatch(calls, expected)`` is the error raised when a forward made another number
    of calls than ``expected`` (+ shift). Shared with Lumina 2 (pag_lumina.py) and OmniGen2 (pag_omnigen2.py)."""
    state = {}
    earlier = to.get("optimized_attention_override")

    def count(executor, x, *args, **kwargs):
        state.update(calls=0, shift=0)
        on_forward(state, executor.class_obj, x, *args, **kwargs)
        out = executor(x, *args, **kwargs)
        if state["calls"] != expected + state["shift"]:
            raise mismatch(state["calls"], expected + state["shift"])
        return out

    def override(func, *a, **kw):
        if attention_chain.is_own(kw):          # another node's own extra call (NASA's negative): not the network's
            return attention_chain.chained(earlier, func, *a, **kw)
        c = state["calls"]
        state["calls"] = c + 1
        if c - state["shift"] in chosen:
            return perturbed(state, *a, **kw)
        return attention_chain.chained(earlier, func, *a, **kw)

    to["optimized_attention_override"] = override
    to.update(attention_chain.counting(to, lambda n: state.update(calls=state["calls"] + n)))   # a cache's skips
    wrappers = to["wrappers"] = dict(to.get("wrappers", {}))
    kind = wrappers[around] = dict(wrappers.get(around, {}))
    kind["trainfree_pag"] = list(kind.get("trainfree_pag", [])) + [count]


def _hidream_tokens(patch, x, context, llama, image_cond, to=None):
    """(image tokens, text tokens) of every HiDream attention call: the latent (and an edit model's image, joined on
    the width) in patches; T5, the last Llama layer and the block's own Llama layer, less the tokens a NASA node
    outside this wrapper appended to them (its calls hand PAG the prompt's part only)."""
    t5 = context.shape[1] - attention_chain.text_tokens_added(to, "context")
    ll = llama.shape[2] - attention_chain.text_tokens_added(to, "llama")
    return dit_layout.hidream_image_tokens(patch, x, image_cond), t5 + 2 * ll


def perturb(to, arch, lay, layers):
    """Install the call numbering and the override in ``to`` (the perturbed pass's transformer_options, a copy):
    ``lay`` the model's ``layout``, ``layers`` the (kind, index, None) layers to perturb."""
    expected, numbers, patch = lay
    name = NAMES[arch]

    def on_forward(state, dm, x, *args, **kwargs):
        if arch == "hidream":           # (x, t, y, context, llama3, image_cond, ...)
            image_cond = args[4] if len(args) > 4 else kwargs.get("image_cond")
            to = kwargs.get("transformer_options", args[-1] if args and isinstance(args[-1], dict) else None)
            state["img"], state["txt"] = _hidream_tokens(patch, x, args[2], args[3], image_cond, to)

    def rows(state, n):
        if arch != "hidream":
            return None                              # the self-attention: output V
        if n - state["txt"] != state["img"]:
            raise RuntimeError(f"PAG (TrainFree) on HiDream: an attention call over {n} tokens, {state['img']} image "
                               f"and {state['txt']} text tokens expected; this ComfyUI's HiDream joins its streams "
                               "differently, so PAG cannot find the image tokens")
        return 0, state["img"]

    def mismatch(calls, want):
        return RuntimeError(f"PAG (TrainFree) on {name}: the network made {calls} attention calls, {want} "
                            "expected; this ComfyUI's network calls attention differently, so PAG cannot find its "
                            "layers")

    if arch == "pixart":
        pixart_options.into(to)
    numbered(to, expected, {numbers[(kind, idx)] for kind, idx, _ in layers}, on_forward,
             lambda state, *a, **kw: pag_math.perturbed_call(lambda n: rows(state, n), *a, **kw), mismatch,
             pe.WrappersMP.APPLY_MODEL if arch == "pixart" else pe.WrappersMP.DIFFUSION_MODEL)
