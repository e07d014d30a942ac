"""What the ComfyUI editor is told: text under a node (what a patch saved, how fast a cache ran), and that a
calibration file was written (web/trainfree.js then refreshes the Load nodes' file lists)."""
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


def report_run(text: str, node_id) -> None:
    """A run's summary: in the console (logger "trainfree") and under node ``node_id`` in the editor."""
    log.info("trainfree: %s", text)
    ui_text(text, node_id)


CALIBRATION_WRITTEN = "trainfree.calibration_written"    # the event web/trainfree.js listens for


def announce_written(path) -> None:
    """Tell every open editor that calibration file ``path`` was written; a no-op without a server."""
    try:
        import server

        instance = getattr(server.PromptServer, "instance", None)
        if instance is not None:
            instance.send_sync(CALIBRATION_WRITTEN, {"folder": path.parent.name, "file": path.name})
    except Exception as e:                                  # must never fail the calibration that was just saved
        log.debug("trainfree: file announcement not sent: %s", e)


def compile_note(model_options: dict) -> str:
    """A remark for measured speed-ups when core's TorchCompileModel is on the model (its first runs compile)."""
    if "torch_compile_kwargs" not in (model_options or {}):
        return ""
    return " (TorchCompileModel: runs that compile or recompile count the compilation in these timings)"
