"""ComfyUI adapter for hybrid_inference (placeholder: nodes land with the method)."""
NODES = {}
DROPDOWN = {}
