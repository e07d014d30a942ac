"""Which calc_cond_batch calls carry CFG's (prompt, negative) pair: the calls the guidance patches may change."""
from __future__ import annotations


def other_guider(holder, conds) -> bool:
    """True for a call with more than CFG's (prompt, negative) pair: DualCFGGuider ([negative, middle, positive]),
    PerpNegGuider ([positive, negative, empty]), ... Their second prompt is not CFG's negative, so the patch
    passes the call through unchanged and its report says so (and how many prompts it saw)."""
    if len(conds) <= 2:
        return False
    holder.other = max(holder.other, len(conds))
    return True


def other_guider_text(method, holder) -> str:
    return (f"{method} inactive: this guider evaluates {holder.other} prompts per step (DualCFGGuider, "
            f"PerpNegGuider, ...); it acts on CFG's prompt / negative pair only (CFGGuider, KSampler)")
