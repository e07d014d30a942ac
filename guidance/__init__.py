"""Pure-torch guidance math: how conditional and unconditional predictions are combined and when an
evaluation may be skipped. No ComfyUI import; nodes/ adapts it (see the README's architecture)."""
