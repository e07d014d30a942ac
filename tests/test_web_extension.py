"""The frontend extension (web/trainfree.js): which nodes it reacts to, and what it does on a run.

The behaviour test runs the real file under Node.js against stand-ins for ComfyUI's frontend
modules (tests/web/); it is skipped, saying why, where no ``node`` executable is installed. That
ComfyUI serves the file is checked in tests/integration/test_server.py.
"""
import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

JS = ROOT / "web" / "trainfree.js"


def _js_writers():
    block = re.search(r"WRITERS = new Set\(\[(.*?)\]\)", JS.read_text(), re.S).group(1)
    return set(re.findall(r'"(\w+)"', block))


def _nodes_writing_files_a_loader_lists():
    """Node classes that call calibration.save() in a module whose loader lists the saved files."""
    found = set()
    for path in (ROOT / "nodes").glob("*.py"):
        src = path.read_text()
        if "list_files(" not in src:
            continue
        for cls in ast.parse(src).body:
            if isinstance(cls, ast.ClassDef) and "calibration.save(" in ast.get_source_segment(src, cls):
                found.add(cls.name)
    return found


def test_web_directory_is_exported():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    values = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert values["WEB_DIRECTORY"] == "./web" and JS.is_file()


def test_writers_are_exactly_the_nodes_that_feed_a_loader():
    writers = _nodes_writing_files_a_loader_lists()
    assert writers == {"TrainFreeDPMSolverV3Calibrate", "TrainFreeDCSolverSearch", "TrainFreeLinearAGCalibrate",
                       "TrainFreeCacheQuantCalibrate"}
    assert _js_writers() == writers


@pytest.fixture
def node_js():
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("Node.js is not installed: the frontend extension's behaviour test needs `node`")
    return exe


def test_dropdowns_refresh_once_after_a_run_that_wrote_a_calibration(node_js, tmp_path):
    """Also when the run was cancelled or failed after the calibration node finished: its file exists."""
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "tests" / "web" / "app_stub.mjs", tmp_path / "scripts" / "app.js")
    (tmp_path / "scripts" / "api.js").write_text('export { api } from "./app.js";\n')
    (tmp_path / "extensions" / "trainfree").mkdir(parents=True)
    shutil.copy(JS, tmp_path / "extensions" / "trainfree" / "trainfree.js")
    shutil.copy(ROOT / "tests" / "web" / "driver.mjs", tmp_path / "driver.mjs")
    done = subprocess.run([node_js, "driver.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["registered"] == ["trainfree.refreshCalibrationFiles"]
    assert set(result["writers"]) == _js_writers()
    assert result["refreshes"] == {"calibration": 1, "cached": 0, "failed": 0, "cancelled_after_write": 1,
                                   "error_after_write": 1, "cancelled_writer": 0, "after_failure": 0, "subgraph": 0}
