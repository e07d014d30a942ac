"""A real ComfyUI, in process: its node loader, its executor and its model classes.

Found through COMFYUI_PATH. The pack is loaded the way ComfyUI loads any pack (a folder in a
``custom_nodes`` path, ``nodes.init_extra_nodes``), next to the test-only pack ``test_nodes``.
"""
from __future__ import annotations

import asyncio
import importlib.machinery
import os
import sys
import tempfile
import types
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-trainfree"
TEST_PACK = "trainfree_test_nodes"


def _torchvision_stand_in():
    """ComfyUI imports torchvision at start-up; a CPU torch may lack a working one."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from a CUDA-only wheel
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        for name in ("torchvision", "torchvision.transforms"):
            m = types.ModuleType(name)
            m.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = m
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]


class _Server:
    """The attributes PromptExecutor touches on PromptServer; records the messages."""

    def __init__(self):
        self.client_id, self.last_node_id, self.last_prompt_id = None, None, None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Comfy:
    """One loaded ComfyUI: ``nodes``, ``execution``, and a prompt runner."""

    def __init__(self, path: str):
        sys.path.insert(0, path)
        _torchvision_stand_in()
        from comfy.cli_args import args

        args.cpu = True
        args.disable_all_custom_nodes = True
        args.whitelist_custom_nodes = [PACK_NAME, TEST_PACK]
        import utils.extra_config  # noqa: F401  (ComfyUI's own `utils` before `nodes` shadows it)
        import folder_paths
        import nodes
        import execution

        self.tmp = Path(tempfile.mkdtemp(prefix="trainfree-comfy-"))
        custom = self.tmp / "custom_nodes"
        custom.mkdir()
        (custom / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
        (custom / TEST_PACK).symlink_to(ROOT / "tests" / "integration" / "test_nodes", target_is_directory=True)
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
        folder_paths.folder_names_and_paths["trainfree"] = ([str(self.tmp / "models" / "trainfree")], {".safetensors"})
        folder_paths.set_output_directory(str(self.tmp / "output"))
        folder_paths.set_temp_directory(str(self.tmp / "temp"))
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        self.server = _Server()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)

    def module_of(self, node_id: str):
        return sys.modules[self.nodes.NODE_CLASS_MAPPINGS[node_id].__module__]

    def pack(self):
        """The pack's root module as ComfyUI imported it."""
        return sys.modules[self.module_of("TrainFreeGHVBSampler").__name__.rsplit(".nodes", 1)[0]]

    def run(self, prompt: dict):
        """Validate and execute an API-format prompt; returns (success, outputs, error messages)."""
        pid = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            return False, {}, [("validation", valid[1], valid[3])]
        self.server.messages.clear()
        self.executor.execute(prompt, pid, {}, valid[2])
        errors = [m for m in self.executor.status_messages if m[0] == "execution_error"]
        return self.executor.success, self.executor.history_result.get("outputs", {}), errors


def comfyui_path():
    return os.environ.get("COMFYUI_PATH") or None
