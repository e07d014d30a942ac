"""ComfyUI adapter for nasa (placeholder: nodes land with the method)."""
NODES = {}
DROPDOWN = {}
