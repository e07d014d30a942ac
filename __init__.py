"""TrainFree: training-free inference techniques for diffusion models, as ComfyUI nodes.

ComfyUI loads this file from ``custom_nodes/``. The math lives in ``samplers/``, ``guidance/`` and
``caching/`` (pure torch); ``nodes/`` adapts it to ComfyUI. Imported outside ComfyUI (no ``comfy``
package), the pack exposes no nodes and its pure layers stay importable. ``web/`` is the frontend
extension ComfyUI serves through WEB_DIRECTORY (it refreshes the loaders' file lists after a
calibration) with the nodes' help pages (``web/docs/<node id>.md``).
"""
import importlib.util

if importlib.util.find_spec("comfy") is None:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
