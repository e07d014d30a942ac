"""Calibration files: safetensors only, keyed, atomic, refused for another model, confined to their folder."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainfree.calibration import CalibrationError, file_in, fingerprint, load, save, stored_keys

KEYS = {"model": "abc123", "schedule": "karras-10", "shape": "4x64x64"}


def test_round_trip(tmp_path):
    t = {"l": torch.randn(5, 3), "s": torch.arange(4.0)}
    path = save(file_in(tmp_path, "ems_test"), t, "dpm_solver_v3", KEYS)
    back = load(path, "dpm_solver_v3", KEYS)
    assert set(back) == {"l", "s"} and all(torch.equal(back[k], t[k]) for k in t)
    assert stored_keys(path) == KEYS
    assert path.read_bytes()[:8] != b"\x80\x04\x95"   # not a pickle
    assert [p.name for p in tmp_path.iterdir()] == ["ems_test.safetensors"]


def test_refuses_other_model_naming_both(tmp_path):
    path = save(file_in(tmp_path, "x"), {"a": torch.ones(1)}, "dpm_solver_v3", KEYS)
    with pytest.raises(CalibrationError, match=r"model: file has 'abc123', this run has 'zzz'"):
        load(path, "dpm_solver_v3", dict(KEYS, model="zzz"))
    with pytest.raises(CalibrationError, match="schedule"):
        load(path, "dpm_solver_v3", dict(KEYS, schedule="normal-20"))
    with pytest.raises(CalibrationError, match="not 'dc_solver'"):
        load(path, "dc_solver", KEYS)


def test_an_optional_key_is_checked_only_when_the_file_has_it(tmp_path):
    """Files written before a key existed (the calibration settings) still load; newer files are checked."""
    old = save(file_in(tmp_path, "old"), {"a": torch.ones(1)}, "m", KEYS)
    assert load(old, "m", dict(KEYS, settings="seed=1"), optional=("settings",))
    with pytest.raises(CalibrationError, match="settings: file has None"):
        load(old, "m", dict(KEYS, settings="seed=1"))
    new = save(file_in(tmp_path, "new"), {"a": torch.ones(1)}, "m", dict(KEYS, settings="seed=0"))
    with pytest.raises(CalibrationError, match="settings: file has 'seed=0', this run has 'seed=1'"):
        load(new, "m", dict(KEYS, settings="seed=1"), optional=("settings",))
    with pytest.raises(CalibrationError, match="model"):
        load(old, "m", dict(KEYS, model="zzz", settings="seed=1"), optional=("settings",))


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load(tmp_path / "nope.safetensors", "m", {})
    path = save(file_in(tmp_path, "t"), {"a": torch.randn(1000)}, "m", {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="unreadable"):
        load(path, "m", {})
    path.write_bytes(b"not a safetensors file")      # what a Load node reads first: the keys
    with pytest.raises(CalibrationError, match="t.safetensors is unreadable"):
        stored_keys(path)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        open(a[1], "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save(file_in(tmp_path, "half"), {"a": torch.ones(2)}, "m", {})
    assert list(tmp_path.iterdir()) == []


ROOT = Path(__file__).resolve().parents[1]
_KILLED_WRITER = """
import os, signal, sys, types
pkg = types.ModuleType("trainfree"); pkg.__path__ = [sys.argv[1]]; sys.modules["trainfree"] = pkg
import safetensors.torch as st, torch
from trainfree.calibration import file_in, save

def half_then_killed(tensors, filename, metadata=None):
    open(filename, "wb").write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)          # the OOM killer, a closed console: no finally runs

st.save_file = half_then_killed
save(file_in(sys.argv[2], sys.argv[3]), {"a": torch.ones(2)}, "m", {})
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals to kill the writer")
def test_temporary_files_of_writers_killed_mid_save_do_not_accumulate(tmp_path):
    for name in ("killed", "other"):
        done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(ROOT), str(tmp_path), name], timeout=300)
        assert done.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(n.startswith((".killed.safetensors.", ".other.safetensors.")) and
                                  n.endswith(".tmp") for n in left)
    old = time.time() - 3600
    for n in left:
        os.utime(tmp_path / n, (old, old))
    live = tmp_path / ".busy.safetensors.4242.tmp"       # another process writing right now: left alone
    live.write_bytes(b"being written")
    unrelated = tmp_path / ".notes.tmp"                   # not a name this module writes
    os.utime(unrelated.write_bytes(b"x") and unrelated, (old, old))
    save(file_in(tmp_path, "killed"), {"a": torch.ones(2)}, "m", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".busy.safetensors.4242.tmp", ".notes.tmp",
                                                          "killed.safetensors"]
    assert torch.equal(load(tmp_path / "killed.safetensors", "m", {})["a"], torch.ones(2))


def test_saved_bytes_reach_the_disk_before_the_file_is_renamed_into_place(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace

    def synced(fd):
        events.append(("fsync", os.fstat(fd).st_ino, os.fstat(fd).st_size))
        return fsync(fd)

    def renamed(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.stat(src).st_size))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    save(file_in(tmp_path, "durable"), {"a": torch.ones(1000)}, "m", {})
    (moved,) = [i for i, e in enumerate(events) if e[0] == "replace"]
    _, inode, size = events[moved]
    assert size > 4000 and ("fsync", inode, size) in events[:moved]


def test_a_file_system_without_fsync_still_gets_the_file(tmp_path, monkeypatch):
    def unsupported(fd):
        raise OSError(22, "Invalid argument")        # some network / FUSE mounts

    monkeypatch.setattr(os, "fsync", unsupported)
    path = save(file_in(tmp_path, "mounted"), {"a": torch.ones(3)}, "m", {})
    assert torch.equal(load(path, "m", {})["a"], torch.ones(3)) and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("name", ["../evil", "a/b", "/etc/passwd", "..", ".hidden", "x" * 200, "a\\b", ""])
def test_names_cannot_leave_the_folder(tmp_path, name):
    with pytest.raises(CalibrationError, match="invalid calibration name"):
        file_in(tmp_path, name)


def test_fingerprint_sees_weights_not_object_identity():
    a = {"w": torch.randn(300, 300), "b": torch.zeros(3)}
    same = {k: v.clone() for k, v in a.items()}
    tuned = {k: v.clone() for k, v in a.items()}
    tuned["w"][0, 0] += 1e-3                      # inside the strided sample
    assert fingerprint(a.items()) == fingerprint(same.items())
    assert fingerprint(a.items()) != fingerprint(tuned.items())
    assert fingerprint(a.items()) != fingerprint(a.items(), extra="lora:0.8")
    assert len(fingerprint(a.items())) == 16 and os.sep not in fingerprint(a.items())
