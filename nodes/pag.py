"""ComfyUI adapter for pag (placeholder: nodes land with the method)."""
NODES = {}
DROPDOWN = {}
