"""The main job, end to end: a real ComfyUI server with the pack in a custom_nodes folder, the
shipped example workflow queued over HTTP, a failing prompt, and the next prompt still working."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from harness import PACK_NAME, ROOT, TEST_PACK, comfyui_path
from test_example_workflows import _for_test
from workflow_format import ui_to_api


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url, data):
    req = urllib.request.Request(url, json.dumps(data).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server_home(tmp_path_factory):
    """The server's base directory: custom_nodes, models (models/trainfree), user, ..."""
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def server(comfyui, server_home):
    tmp = server_home
    (tmp / "custom_nodes").mkdir()
    (tmp / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    (tmp / "custom_nodes" / TEST_PACK).symlink_to(ROOT / "tests" / "integration" / "test_nodes", target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(tmp), "--output-directory", str(tmp / "out"),   # models/trainfree in tmp too
           "--database-url", "sqlite:///:memory:", "--disable-all-custom-nodes",
           "--whitelist-custom-nodes", PACK_NAME, TEST_PACK]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _get(base + "/system_stats")
                break
            except OSError:
                assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _queue_and_wait(base, prompt):
    status, body = _post(base + "/prompt", {"prompt": prompt, "client_id": "trainfree-tests"})
    if status != 200:
        return "rejected", body
    pid = body["prompt_id"]
    for _ in range(240):
        hist = _get(f"{base}/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            return hist[pid]["status"]["status_str"], hist[pid]
        time.sleep(0.25)
    raise TimeoutError(pid)


def test_server_serves_the_pack_and_runs_an_example(server, comfyui):
    info = _get(server + "/object_info/TrainFreeGHVBSampler")["TrainFreeGHVBSampler"]
    assert info["category"] == "trainfree/samplers" and info["input"]["required"]["order"][1]["tooltip"]
    assert "trainfree_ghvb" in _get(server + "/object_info/KSampler")["KSampler"]["input"]["required"]["sampler_name"][0]
    templates = _get(server + "/api/workflow_templates")
    assert "ghvb_sampler" in templates[PACK_NAME]
    ui = _get(f"{server}/api/workflow_templates/{PACK_NAME}/ghvb_sampler.json")
    api = _for_test(ui_to_api(ui, comfyui.nodes.NODE_CLASS_MAPPINGS), "sd15")
    status, hist = _queue_and_wait(server, api)
    assert status == "success", hist["status"]
    assert any("finite=True" in v.get("text", [""])[0] for v in hist["outputs"].values())


def test_failing_prompt_leaves_the_server_working(server, comfyui):
    from prompts import custom_advanced

    status, hist = _queue_and_wait(server, custom_advanced("TrainFreeGHVBSampler", {"order": 3.5}, flip_sigmas=True))
    assert status == "error"
    errors = [m for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert "strictly decreasing" in errors[0][1]["exception_message"]
    status, _ = _queue_and_wait(server, custom_advanced("TrainFreeTimeShiftDDIMSampler",
                                                        {"window": 80, "cutoff": 300, "data_variance": 0.0}, seed=9))
    assert status == "success"


def test_server_serves_the_frontend_extension(server):
    listed = _get(server + "/extensions")
    assert f"/extensions/{PACK_NAME}/trainfree.js" in listed
    with urllib.request.urlopen(f"{server}/extensions/{PACK_NAME}/trainfree.js", timeout=10) as r:
        assert r.status == 200 and b'registerExtension' in r.read()


def test_every_node_help_page_is_served_where_the_editor_looks(server):
    """The editor's node documentation panel fetches /extensions/<pack id from python_module>/docs/<node id>.md."""
    info = _get(server + "/object_info")
    ours = {name: n["python_module"] for name, n in info.items() if n.get("python_module", "").endswith(PACK_NAME)}
    assert len(ours) >= 25
    for name, module in ours.items():
        pack_id = module.split(".")[1]                              # the frontend's extractCustomNodeName
        with urllib.request.urlopen(f"{server}/extensions/{pack_id}/docs/{name}.md", timeout=10) as r:
            assert r.status == 200
            page = r.read().decode()
        assert page.startswith(f"# {info[name]['display_name']}"), name


def test_an_open_editor_is_told_when_a_calibration_file_is_written(server, server_home, comfyui):
    """The event web/trainfree.js refreshes the Load nodes' lists on reaches every open editor over the websocket
    (here one that did not queue the run), once per file written."""
    import asyncio

    import aiohttp

    ui = json.loads((ROOT / "example_workflows" / "linear_ag_calibrate_and_sample.json").read_text())
    api = _for_test(ui_to_api(ui, comfyui.nodes.NODE_CLASS_MAPPINGS), "sd15")
    for node in api.values():
        if node["class_type"] == "TrainFreeLinearAGCalibrate":
            node["inputs"]["overwrite"] = True

    async def listen():
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(server.replace("http", "ws", 1) + "/ws?clientId=another-tab") as ws:
            status = await asyncio.to_thread(_queue_and_wait, server, api)
            seen = []
            while True:
                try:
                    msg = await ws.receive(timeout=2)
                except asyncio.TimeoutError:
                    return status, seen
                if msg.type == aiohttp.WSMsgType.TEXT:
                    seen.append(json.loads(msg.data))

    (status, _), seen = asyncio.run(listen())
    assert status == "success"
    written = [m["data"] for m in seen if m["type"] == "trainfree.calibration_written"]
    files = sorted((server_home / "models" / "trainfree").rglob("*.safetensors"))
    assert len(files) == 1 and written == [{"folder": files[0].parent.name, "file": files[0].name}]
