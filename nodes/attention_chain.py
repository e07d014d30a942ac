"""How the pack's attention overrides (``transformer_options["optimized_attention_override"]``) share a forward.

* ``chained`` hands a call on to the override installed before this one, or to ComfyUI's attention.
* ``own`` marks the extra attention calls a node makes on its own account (NASA's negative-prompt attentions), and
  ``is_own`` tells them apart: an override that numbers the network's calls (PAG on HiDream, Cosmos-Predict2,
  PixArt, Lumina 2; NASA on Wan and HiDream) passes them by without counting or changing them. The mark rides in
  the call's ``transformer_options``, so it reaches every override further down the chain.
* ``add_text_tokens`` / ``text_tokens_added``: a DIFFUSION_MODEL wrapper that appends text tokens to a network's
  inputs (NASA on HiDream) records how many, so a wrapper inside it that counts the prompt's tokens (PAG's) can tell
  them from the prompt's.
* ``counting`` / ``skipped``: an override that numbers a forward's calls registers its counter; where a block cache
  skips blocks of a network whose calls are numbered (the block patches nodes/block_patches.py gives Lumina 2,
  OmniGen2, HiDream, Cosmos-Predict2 and PixArt), it says how many calls the skipped blocks would have made, so the
  numbers after them stay the blocks' own.
"""
from __future__ import annotations

OWN = "trainfree_own_call"
ADDED = "trainfree_added_text_tokens"
COUNTERS = "trainfree_call_counters"


def chained(earlier, func, *a, **kw):
    return earlier(func, *a, **kw) if earlier is not None else func(*a, **kw)


def own(kw: dict) -> dict:
    """The keyword arguments of an attention call, its transformer_options marked as a node's own call."""
    return dict(kw, transformer_options={**(kw.get("transformer_options") or {}), OWN: True})


def is_own(kw: dict) -> bool:
    return bool((kw.get("transformer_options") or {}).get(OWN, False))


def add_text_tokens(to: dict, **counts: int) -> dict:
    """A copy of the transformer_options ``to`` recording ``counts`` more appended tokens per text input."""
    added = dict(to.get(ADDED, {}))
    for name, n in counts.items():
        added[name] = added.get(name, 0) + int(n)
    return dict(to, **{ADDED: added})


def text_tokens_added(to: dict | None, name: str) -> int:
    return int(((to or {}).get(ADDED) or {}).get(name, 0))


def counting(to: dict, advance) -> dict:
    """A copy of the transformer_options ``to`` whose skipped calls also reach ``advance(n)``."""
    return dict(to, **{COUNTERS: (*to.get(COUNTERS, ()), advance)})


def skipped(to: dict | None, calls: int) -> None:
    """``calls`` attention calls of the network were skipped (a cached layer): advance every registered counter."""
    for advance in (to or {}).get(COUNTERS, ()):
        advance(calls)
