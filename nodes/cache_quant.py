"""ComfyUI adapter for cache_quant (placeholder: nodes land with the method)."""
NODES = {}
DROPDOWN = {}
