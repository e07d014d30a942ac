"""ComfyUI integration fixtures: skipped, saying why, when COMFYUI_PATH is not set."""
import pytest

from harness import Comfy, comfyui_path

_COMFY = None


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is None:
        skip = pytest.mark.skip(reason="COMFYUI_PATH is not set: point it at a ComfyUI checkout to run "
                                       "the integration tests (see README, 'Tests')")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui():
    global _COMFY
    if _COMFY is None:
        _COMFY = Comfy(comfyui_path())
    return _COMFY


@pytest.fixture
def models_dir(comfyui, tmp_path, monkeypatch):
    """A fresh models/trainfree folder for calibration files."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "trainfree", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


class Editors:
    """Stands in for server.PromptServer.instance: records the events sent to the open editors."""

    client_id = None

    def __init__(self):
        self.sent = []                      # (event, data, sid)

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        pass

    def events(self, name):
        return [(data, sid) for e, data, sid in self.sent if e == name]


@pytest.fixture
def editors(comfyui, monkeypatch):
    import server

    recorder = Editors()
    monkeypatch.setattr(server.PromptServer, "instance", recorder, raising=False)
    return recorder
