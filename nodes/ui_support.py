"""Text under a node in the ComfyUI editor (what a patch saved, how fast a cache ran)."""
from __future__ import annotations

import logging

log = logging.getLogger("trainfree")


def ui_text(text: str, node_id) -> None:
    """Show ``text`` on node ``node_id`` through the running server; a no-op without one (tests, scripts)."""
    if node_id is None:
        return
    try:
        import server

        instance = getattr(server.PromptServer, "instance", None)
        if instance is not None and hasattr(instance, "send_progress_text"):
            instance.send_progress_text(text, node_id)
    except Exception as e:                                  # reporting must never fail a finished run
        log.debug("trainfree: UI text not sent: %s", e)
