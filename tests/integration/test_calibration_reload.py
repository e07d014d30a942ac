"""Calibration files changed on disk within one server session: Load nodes read the new file (not ComfyUI's cached
old result), writer nodes run again when their file was deleted or replaced, and an unchanged file keeps both
cached (no recalibration on every queue)."""
import copy
import os

import pytest

from test_interrupted_runs import WRITERS, _api

LOADS = ("TrainFreeDPMSolverV3Load", "TrainFreeDCSolverLoad", "TrainFreeLinearAGLoad", "TrainFreeCacheQuantLoad")
CASES = [("dpm_solver_v3_calibrate_and_sample", "dpm_solver_v3_load_and_sample"),
         ("dc_solver_search_and_sample", "dc_solver_load_and_sample"),
         ("linear_ag_calibrate_and_sample", "linear_ag_load_and_sample"),
         ("cache_quant_calibrate_and_sample", "cache_quant_load_and_sample"),
         ("schedule_search", None)]


def _node(api, types):
    (found,) = [k for k, n in api.items() if n["class_type"] in types]
    return found


def _executed(comfyui, prompt):
    """The nodes a queued prompt executed (not served from the cache)."""
    ok, _, err = comfyui.run(copy.deepcopy(prompt))
    assert ok, err
    cached = [set(d["nodes"]) for e, d in comfyui.executor.status_messages if e == "execution_cached"]
    assert len(cached) == 1
    return set(prompt) - cached[0]


def _output(comfyui, node):
    entry = comfyui.executor.caches.outputs.get(node)
    return getattr(entry, "outputs", entry)[0][0]


@pytest.fixture
def executor(comfyui, request):
    """A new executor with the given cache type (CLASSIC keeps only the last prompt's outputs; LRU, ComfyUI's
    --cache-lru, keeps other prompts' too); the session's one is put back after."""
    kept, execution = comfyui.executor, comfyui.execution
    comfyui.executor = execution.PromptExecutor(comfyui.server, cache_type=execution.CacheType[request.param],
                                                cache_size=50)
    yield
    comfyui.executor = kept


def _replace(path, content):
    """Replace the file as a user or another program does (a new file renamed over it)."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(content)
    os.replace(tmp, path)


@pytest.mark.parametrize("executor", ["CLASSIC", "LRU"], indirect=True)
@pytest.mark.parametrize("maker,loader", CASES, ids=[c[0] for c in CASES])
def test_changed_files_are_read_again_and_unchanged_ones_stay_cached(comfyui, models_dir, executor, maker, loader):
    calibrate = _api(comfyui, maker, "flux")
    writer = _node(calibrate, WRITERS)
    seed = calibrate[writer]["inputs"]["seed"]
    assert writer in _executed(comfyui, calibrate)
    (path,) = [p for p in models_dir.rglob("*.safetensors")]
    assert writer not in _executed(comfyui, calibrate)                  # unchanged file: cached, not recalibrated
    first = path.read_bytes()
    calibrate[writer]["inputs"].update(seed=seed + 1, overwrite=True)
    assert writer in _executed(comfyui, calibrate)                      # recalibrated with overwrite
    assert writer not in _executed(comfyui, calibrate)
    if loader is not None:
        stored = comfyui.pack().calibration.stored_keys
        load = _api(comfyui, loader, "flux")
        reader = _node(load, LOADS)
        assert reader in _executed(comfyui, load)
        seen = [_output(comfyui, reader).keys]
        assert seen[0] == stored(path)
        assert reader not in _executed(comfyui, load)                   # unchanged file: cached
        _replace(path, first)                                           # replaced by hand
        assert reader in _executed(comfyui, load)                       # ... and read again
        seen.append(_output(comfyui, reader).keys)
        assert seen[1] == stored(path) != seen[0]
        assert reader not in _executed(comfyui, load)
        calibrate[writer]["inputs"].update(seed=seed + 2)
        assert writer in _executed(comfyui, calibrate)                  # recalibrated with overwrite in one prompt
        assert reader in _executed(comfyui, load)                       # the next prompt's Load reads the new file
        seen.append(_output(comfyui, reader).keys)
        assert seen[2] == stored(path) and seen[2] not in seen[:2]
        _executed(comfyui, calibrate)              # (the classic cache keeps only the last prompt's outputs)
        assert writer not in _executed(comfyui, calibrate)
    path.unlink()
    assert writer in _executed(comfyui, calibrate) and path.is_file()   # deleted: computed and written again
    assert writer not in _executed(comfyui, calibrate)
    _replace(path, path.read_bytes())
    assert writer in _executed(comfyui, calibrate)                      # replaced by hand: read again
    assert writer not in _executed(comfyui, calibrate)


def test_is_changed_never_raises(comfyui, models_dir):
    for node in LOADS + WRITERS:
        cls = comfyui.nodes.NODE_CLASS_MAPPINGS[node]
        for name in ("no_such_file.safetensors", "../bad/name", None, 3):
            value = cls.IS_CHANGED(**{n: name for n in ("name", "ems_name", "ratios_name", "coefficients_name",
                                                        "schedule_name")})
            assert isinstance(value, str) and value == cls.IS_CHANGED(
                **{n: name for n in ("name", "ems_name", "ratios_name", "coefficients_name", "schedule_name")})


@pytest.mark.parametrize("maker", [c[0] for c in CASES])
def test_writers_announce_each_new_file_to_the_editors(comfyui, models_dir, editors, maker):
    """The event web/trainfree.js refreshes the Load nodes' lists on: once per file written, to every editor
    (also for a node inside a subgraph or a run queued over the API), and not when a file is reused."""
    calibrate = _api(comfyui, maker, "flux")
    writer = _node(calibrate, WRITERS)
    calibrate[writer]["inputs"]["overwrite"] = False
    assert writer in _executed(comfyui, calibrate)
    (path,) = [p for p in models_dir.rglob("*.safetensors")]
    announced = editors.events("trainfree.calibration_written")
    assert announced == [({"folder": path.parent.name, "file": path.name}, None)]
    editors.sent.clear()
    kept = comfyui.executor                 # a fresh executor (a restarted server): the node runs, reuses the file
    comfyui.executor = comfyui.execution.PromptExecutor(comfyui.server, cache_type=comfyui.execution.CacheType.CLASSIC)
    try:
        assert writer in _executed(comfyui, calibrate)
    finally:
        comfyui.executor = kept
    assert editors.events("trainfree.calibration_written") == []
