"""Cancel or an error in the middle of a run, for every node of the pack: the next runs behave as fresh ones.

Each shipped example workflow (every node is in one) is queued on one executor the way a user does: once, then
cancelled half-way through sampling (Cancel through ComfyUI's progress hook) or broken by an out-of-memory error
half-way through a model evaluation, then queued again. Upstream outputs stay cached between these queues, so the
patched MODEL, GUIDER and SAMPLER objects the failed run used are reused. The reruns (the same prompt, another
seed and resolution, and the unpatched checkpoint) must give bit-identical latents to runs on a fresh executor,
and no cached model may have gained a wrapper, an option or an object patch. Calibration nodes stopped half-way
must leave nothing in models/trainfree, and the next calibration computes (not reuses) the complete file.
"""
import copy
import hashlib
import json
import os
import time

import pytest

from faults import cancel_at, fail_at_linear
from harness import ROOT
from prompts import ksampler
from test_example_workflows import LOADERS, _for_test
from workflow_format import ui_to_api

SAMPLER = "9"                      # the sampling node of every example workflow
ARCH = {"cache_quant_calibrate_and_sample": "flux", "cache_quant_load_and_sample": "sd3", "dit_cache": "wan",
        "ghvb_sampler": "flux", "cfg_pp_sampler": "flux", "time_shift_dpmpp_2m_sampler": "flux", "nasa": "flux",
        "hybrid_inference": "flux", "pag": "flux", "adaptive_guidance_guider": "flux",
        "linear_ag_load_and_sample": "flux", "dc_solver_search_and_sample": "flux", "dc_solver_load_and_sample": "flux",
        "dpm_solver_v3_load_and_sample": "flux", "dpm_solver_v3_calibrate_and_sample": "flux",
        "schedule_search": "flux"}
EXAMPLES = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
SEARCHES = {"dc_solver_search_and_sample", "dpm_solver_v3_calibrate_and_sample", "schedule_search"}
SMALLER = {"TrainFreeDCSolverSearch": {"steps": "5", "iterations": 2}}    # searches on the test models, faster
STATEFUL = {"adaptive_guidance", "adaptive_guidance_guider", "cache_quant_load_and_sample", "cfg_pp_ksampler",
            "deep_cache", "dit_cache", "hybrid_inference", "linear_ag_load_and_sample", "nasa", "pag"}
WRITERS = ("TrainFreeDPMSolverV3Calibrate", "TrainFreeDCSolverSearch", "TrainFreeLinearAGCalibrate",
           "TrainFreeCacheQuantCalibrate", "TrainFreeScheduleSearch")


@pytest.fixture
def executors(comfyui):
    """``fresh()`` gives the harness a new PromptExecutor (nothing cached); the session's one is put back after."""
    kept = comfyui.executor

    def fresh():
        execution = comfyui.execution
        comfyui.executor = execution.PromptExecutor(comfyui.server, cache_type=execution.CacheType.CLASSIC)

    yield fresh
    comfyui.executor = kept


def _api(comfyui, stem, arch):
    api = _for_test(ui_to_api(json.loads((ROOT / "example_workflows" / f"{stem}.json").read_text()),
                              comfyui.nodes.NODE_CLASS_MAPPINGS), arch)
    for node in api.values():
        node["inputs"].update(SMALLER.get(node["class_type"], {}))
    return api


def _example(comfyui, stem, arch):
    """The example as the test queues it; a Load example first gets the file its calibration example writes
    (on the executor in use: give it a fresh one, or the calibration may be served from its cache)."""
    api = _api(comfyui, stem, arch)
    for loader, maker in LOADERS.items():
        if any(n["class_type"] == loader for n in api.values()):
            assert comfyui.run(_api(comfyui, maker[:-len(".json")], arch))[0]
    return api


def _variant(api):
    """The same graph with another noise seed and another latent size for the sampler."""
    out = copy.deepcopy(api)
    node = out[SAMPLER]["inputs"]
    if "seed" in node:
        node["seed"] += 1
    else:
        out[node["noise"][0]]["inputs"]["noise_seed"] += 1
    out[node["latent_image"][0]]["inputs"].update(width=48, height=48)
    return out


def _plain(arch):
    """The unpatched checkpoint (the same cached model object as the examples') through a plain KSampler."""
    return ksampler("euler", arch=arch, steps=4, cfg=4.0, size=64, seed=5)


def _latents(comfyui, prompt):
    ok, outputs, err = comfyui.run(copy.deepcopy(prompt))
    assert ok, err
    found = {k: v["sha256"][0] for k, v in outputs.items() if "sha256" in v}
    assert found
    return found


def _shape(options):
    """Keys and list lengths of nested model options (a patch or post-CFG function added twice shows)."""
    if isinstance(options, dict):
        return sorted((str(k), _shape(v)) for k, v in options.items())
    return len(options) if isinstance(options, (list, tuple)) else None


def _models(comfyui, api):
    """Every cached MODEL output of ``api``: its wrappers (with counts), options and object patches."""
    import comfy.model_patcher

    seen = {}
    for node_id in api:
        entry = comfyui.executor.caches.outputs.get(node_id)
        outputs = getattr(entry, "outputs", entry) or []
        for i, values in enumerate(outputs):
            for j, m in enumerate(values or []):
                if isinstance(m, comfy.model_patcher.ModelPatcher):
                    seen[(node_id, i, j)] = (
                        sorted((str(t), str(k), len(w)) for t, per in m.wrappers.items() for k, w in per.items()),
                        _shape(m.model_options), sorted(m.object_patches))
    assert seen
    return seen


def _fails(comfyui, prompt, kind):
    import comfy.model_management as mm

    ok, _, _ = comfyui.run(copy.deepcopy(prompt))
    events = [m[0] for m in comfyui.executor.status_messages]
    assert not ok and events[-1] == ("execution_interrupted" if kind == "cancel" else "execution_error"), events
    assert not mm.processing_interrupted()


def _fail_halfway(comfyui, api, node, kind, ticks, calls):
    """Run ``api`` and stop ``node`` half-way through its counted ticks (Cancel) or linear calls (an OOM)."""
    if kind == "cancel":
        with cancel_at(node, ticks["ticks"] // 2):
            _fails(comfyui, api, kind)
    else:
        with fail_at_linear(node, calls["calls"] // 2 + 1):
            _fails(comfyui, api, kind)


@pytest.mark.parametrize("stem", [s for s in EXAMPLES if s not in SEARCHES])   # searches: below
def test_reruns_after_a_cancelled_or_failed_run_are_bit_identical_to_fresh_runs(comfyui, models_dir, executors,
                                                                                stem):
    arch = ARCH.get(stem, "sd15")
    executors()
    api = _example(comfyui, stem, arch)
    other, plain = _variant(api), _plain(arch)
    executors()
    want = _latents(comfyui, api)
    executors()
    want_other = _latents(comfyui, other)
    executors()
    want_plain = _latents(comfyui, plain)
    for kind in ("cancel", "oom") if stem in STATEFUL else ("cancel",):
        executors()
        with cancel_at(SAMPLER, None) as ticks, fail_at_linear(SAMPLER, None) as calls:
            assert _latents(comfyui, other) == want_other           # a user's earlier run: everything cached
        models = _models(comfyui, other)
        assert ticks["ticks"] >= 4 and calls["calls"] >= 4
        _fail_halfway(comfyui, api, SAMPLER, kind, ticks, calls)
        assert _latents(comfyui, api) == want, kind
        assert _latents(comfyui, other) == want_other, kind
        assert _models(comfyui, other) == models, kind              # nothing added, nothing left over
        assert _latents(comfyui, plain) == want_plain, kind         # the shared checkpoint model is untouched
        assert _latents(comfyui, api) == want, kind


def test_the_ksampler_dropdown_entries_rerun_bit_identically_after_cancel(comfyui, executors):
    names = comfyui.pack().nodes.DROPDOWN_SAMPLERS
    assert len(names) >= 10
    for name in names:
        prompt = ksampler(name, steps=6, cfg=0.8 if name.endswith("_cfg_pp") else 4.0, seed=2)
        executors()
        want = _latents(comfyui, prompt)
        executors()
        with cancel_at("ks", 3):
            _fails(comfyui, prompt, "cancel")
        assert _latents(comfyui, prompt) == want, name


def test_every_node_is_stopped_half_way_here(comfyui):
    graphs = {stem: _api(comfyui, stem, ARCH.get(stem, "sd15")).values() for stem in EXAMPLES}
    tested = {n["class_type"] for stem, nodes in graphs.items() if stem not in SEARCHES for n in nodes}
    tested |= {n["class_type"] for stem in CALIBRATIONS for n in graphs[stem] if n["class_type"] in WRITERS}
    assert set(comfyui.pack().NODE_CLASS_MAPPINGS) <= tested


def _files(folder):
    """(relative path, tensors and metadata digest) of every file under ``folder``, hidden ones included (those
    not a calibration: digest None)."""
    from safetensors import safe_open

    out = []
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        digest = None
        if p.suffix == ".safetensors" and not p.name.startswith("."):
            with safe_open(str(p), framework="pt") as f:
                meta = sorted((f.metadata() or {}).items())
                data = [(k, f.get_tensor(k).contiguous().numpy().tobytes()) for k in sorted(f.keys())]
            digest = hashlib.sha256(repr((meta, data)).encode()).hexdigest()
        out.append((p.relative_to(folder).as_posix(), digest))
    return out


CALIBRATIONS = sorted(s for s in EXAMPLES if s.endswith(("calibrate_and_sample", "search_and_sample")) or
                      s == "schedule_search")


@pytest.mark.parametrize("stem", CALIBRATIONS)
@pytest.mark.parametrize("kind,overwrite", [("cancel", True), ("oom", False)])
def test_a_calibration_stopped_half_way_leaves_nothing_and_the_next_one_is_complete(comfyui, models_dir, executors,
                                                                                    stem, kind, overwrite):
    """overwrite False: what a stopped calibration left must not pass for a finished one."""
    arch = ARCH.get(stem, "sd15")
    api = _api(comfyui, stem, arch)
    (writer,) = [k for k, n in api.items() if n["class_type"] in WRITERS]
    executors()
    with cancel_at(writer, None) as ticks, fail_at_linear(writer, None) as calls:
        want = _latents(comfyui, api)
    want_files = _files(models_dir)
    assert len(want_files) == 1 and ticks["ticks"] >= 4 and calls["calls"] >= 4
    for p in models_dir.rglob("*"):
        if p.is_file():
            p.unlink()
    api[writer]["inputs"]["overwrite"] = overwrite
    executors()
    _fail_halfway(comfyui, api, writer, kind, ticks, calls)
    assert [p for p in models_dir.rglob("*") if p.is_file()] == []
    folder = models_dir / want_files[0][0].split("/")[0]     # a writer killed mid-save left its temporary file
    folder.mkdir(exist_ok=True)
    killed = folder / f".{want_files[0][0].split('/')[1]}.999999.tmp"
    killed.write_bytes(b"half a file")
    os.utime(killed, (time.time() - 3600,) * 2)
    with cancel_at(writer, None) as again:
        assert _latents(comfyui, api) == want
    assert again["ticks"] == ticks["ticks"]       # calibrated anew, in full
    assert _files(models_dir) == want_files       # complete, and the temporary file of the killed writer is gone


def test_a_cancelled_run_announces_the_file_iff_the_calibration_finished(comfyui, models_dir, executors, editors):
    """web/trainfree.js refreshes the loaders' file lists on the writer's event: sent when the calibration finished
    before the Cancel (the file exists), never when the calibration itself was cancelled."""
    api = _api(comfyui, "linear_ag_calibrate_and_sample", "sd15")
    (writer,) = [k for k, n in api.items() if n["class_type"] in WRITERS]
    for node, written in ((writer, False), (SAMPLER, True)):   # cancelled during the calibration, or after it
        executors()
        editors.sent.clear()
        with cancel_at(node, 3):
            _fails(comfyui, api, "cancel")
        assert len(editors.events("trainfree.calibration_written")) == int(written)
        assert bool(list(models_dir.rglob("*.safetensors"))) is written


@pytest.mark.parametrize("stem", ["linear_ag_load_and_sample", "cache_quant_load_and_sample"])
def test_a_run_refused_inside_sampling_leaves_nothing_behind(comfyui, models_dir, executors, stem):
    """The calibrated patches refuse another step count once sampling has started (other wrappers already set up)."""
    arch = ARCH.get(stem, "sd15")
    executors()
    api = _example(comfyui, stem, arch)
    wrong = copy.deepcopy(api)
    wrong[SAMPLER]["inputs"]["steps"] -= 1
    executors()
    want = _latents(comfyui, api)
    executors()
    assert _latents(comfyui, _variant(api))
    models = _models(comfyui, api)
    ok, _, err = comfyui.run(copy.deepcopy(wrong))
    assert not ok and "CalibrationError" in err[0][1]["exception_type"]
    assert _latents(comfyui, api) == want
    assert _models(comfyui, api) == models
