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


def _js_event():
    return re.search(r'export const EVENT = "([\w.]+)"', JS.read_text()).group(1)


def _py_event():
    tree = ast.parse((ROOT / "nodes" / "ui_support.py").read_text())
    return next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "CALIBRATION_WRITTEN" for t in n.targets))


def test_web_directory_is_exported():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    values = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert values["WEB_DIRECTORY"] == "./web" and JS.is_file()


def test_the_extension_listens_for_the_event_the_nodes_send():
    assert _js_event() == _py_event() == "trainfree.calibration_written"


def test_every_node_that_writes_a_calibration_announces_it():
    """Node modules save through calibration_support.save (which announces the file), never calibration.save."""
    direct = [p.name for p in (ROOT / "nodes").glob("*.py")
              if p.name != "calibration_support.py" and "calibration.save(" in p.read_text()]
    assert direct == []
    src = (ROOT / "nodes" / "calibration_support.py").read_text()
    body = ast.get_source_segment(src, next(f for f in ast.parse(src).body
                                            if isinstance(f, ast.FunctionDef) and f.name == "save"))
    assert "calibration.save(" in body and "announce_written(" in body
    writers = {p.name for p in (ROOT / "nodes").glob("*.py") if re.search(r"^\s+save\(path", p.read_text(), re.M)}
    assert writers == {"dpm_solver_v3.py", "dc_solver.py", "linear_ag.py", "cache_quant.py", "autodiffusion.py"}


@pytest.fixture
def node_js():
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("Node.js is not installed: the frontend extension's behaviour test needs `node`")
    return exe


def test_dropdowns_refresh_when_a_calibration_file_is_written(node_js, tmp_path):
    """On the nodes' event only: also in a subgraph, for another client's run, and when the run was cancelled or
    failed after the file was written; never for a cached or failed calibration."""
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
    assert result["event"] == _py_event()
    assert result["refreshes"] == {"calibration": 1, "cached": 0, "failed": 0, "cancelled_after_write": 1,
                                   "error_after_write": 1, "subgraph": 1, "other_client": 1, "two_files": 2,
                                   "plain": 0}
    assert result["failureLogged"] is True
