"""ComfyUI adapter for cfg_pp (placeholder: nodes land with the method)."""
NODES = {}
DROPDOWN = {}
