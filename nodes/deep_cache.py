"""ComfyUI adapter for deep_cache (placeholder: nodes land with the method)."""
NODES = {}
DROPDOWN = {}
