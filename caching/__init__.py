"""Pure-torch caching math: what is cached, when it is reused and how its error is corrected.
No ComfyUI import; nodes/ adapts it (see the README's architecture)."""
