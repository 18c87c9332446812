"""Training-state folders and the run folder, without a model: atomic states that verify, torn
ones skipped for the previous good one, pruning that never loses the newest good state, a
resume that rewinds what a killed run wrote after its state, and a --save_path that is never
silently reused."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from gm.errors import ConfigError
from gm.run_folder import check_save_path, clear_run, config_differences, rewind_run
from gm.train_state import find_state, load_state, prune_states, save_state, state_folders, verify_state


def _arrays(step):
    rng = np.random.default_rng(step)
    return {"lora.down": rng.standard_normal((4, 8)).astype(np.float32),
            "exp_avg.lora.down": rng.standard_normal((4, 8)).astype(np.float32),
            "optimizer.state_step": np.array(step, np.int32), "train_step.loss_scale": np.array(1.0, np.float32)}


def _save(root, step):
    return save_state(root, step, _arrays(step), {"loss_before": 0.5, "skipped": {"total": 0, "in_a_row": 0}},
                      "lora:\n  rank: 4\n")


def test_state_round_trips_exactly_and_keeps_scalars(tmp_path):
    folder = _save(tmp_path, 4)
    assert folder.name == "step_000004" and verify_state(folder) is None
    state = load_state(find_state(tmp_path, "latest"))
    assert state.step == 4 and state.meta["loss_before"] == 0.5 and state.config_text == "lora:\n  rank: 4\n"
    for key, value in _arrays(4).items():
        assert state.arrays[key].shape == value.shape and state.arrays[key].dtype == value.dtype
        np.testing.assert_array_equal(state.arrays[key], value)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "manifest.json", "state.json",
                                                        "train_state.safetensors"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "delete_file"])
def test_a_torn_newest_state_is_skipped_for_the_previous_good_one(tmp_path, damage, caplog):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    arrays = newest / "train_state.safetensors"
    if damage == "flip_byte":
        data = bytearray(arrays.read_bytes())
        data[-3] ^= 0xFF
        arrays.write_bytes(bytes(data))
    elif damage == "truncate":
        arrays.write_bytes(arrays.read_bytes()[:100])
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "state.json").unlink()
    # a write killed before its rename leaves only a temporary folder: never listed
    (tmp_path / "state" / ".step_000006.abc").mkdir()
    with caplog.at_level(logging.WARNING):
        found = find_state(tmp_path, "latest")
    assert found.name == "step_000002"
    assert "step_000004" in caplog.text
    with pytest.raises(ConfigError, match="step_000004"):
        find_state(tmp_path, str(newest))
    assert [p.name for p in state_folders(tmp_path)] == ["step_000002", "step_000004"]


def test_no_state_to_resume_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no complete training state"):
        find_state(tmp_path, "latest")
    with pytest.raises(ConfigError, match="no such state folder"):
        find_state(tmp_path, str(tmp_path / "state" / "step_000001"))


def test_pruning_keeps_the_newest_good_states(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step)
    (tmp_path / "state" / ".step_000010.tmp").mkdir()  # a killed write's leftovers go too
    prune_states(tmp_path, 2)
    assert [p.name for p in state_folders(tmp_path)] == ["step_000006", "step_000008"]
    assert not list((tmp_path / "state").glob(".step_*"))
    # the newest two are torn: the newest good one survives whatever the limit
    for step in (10, 12):
        (_save(tmp_path, step) / "manifest.json").unlink()
    prune_states(tmp_path, 1)
    assert [p.name for p in state_folders(tmp_path)] == ["step_000008", "step_000010", "step_000012"]


def test_a_save_path_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    save = tmp_path / "run"
    check_save_path(save, resume=False, overwrite=False)  # new: its parent probed, nothing made
    assert not save.exists() and not list(tmp_path.iterdir())
    save.mkdir()
    (save / "train_log.jsonl").write_text('{"step": 1}\n')
    (save / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a training run .train_log.jsonl.*--resume_from_checkpoint"):
        check_save_path(save, resume=False, overwrite=False)
    check_save_path(save, resume=True, overwrite=False)
    check_save_path(save, resume=False, overwrite=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        check_save_path(save, resume=True, overwrite=True)
    assert clear_run(save) == ["train_log.jsonl"]
    assert (save / "notes.txt").read_text() == "mine"  # not the run's: kept
    with pytest.raises(ConfigError, match="is a file"):
        check_save_path(save / "notes.txt", resume=False, overwrite=False)


def test_resume_rewinds_what_the_killed_run_wrote_after_the_state(tmp_path):
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in range(1, 6)]
    (tmp_path / "train_log.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # torn by the kill
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (2, 4):
        (ckpts / f"sdxl_lora_step{step:06d}.safetensors").write_text("x")
    for step in (3, 6):
        (tmp_path / "samples" / f"step{step:06d}").mkdir(parents=True)
    (tmp_path / "summary.json").write_text("{}")
    assert rewind_run(tmp_path, 3) == 3
    assert (tmp_path / "train_log.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    assert sorted(p.name for p in ckpts.iterdir()) == ["sdxl_lora_step000002.safetensors"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step000003"]
    assert not (tmp_path / "summary.json").exists()


def test_config_differences_name_the_changed_key():
    saved = "lora:\n  rank: 4\ntrain:\n  seed: 0\n  save_ckpt_interval: 10\ncli:\n  weight: a\n  save_path: x\n"
    same = {"lora": {"rank": 4}, "train": {"seed": 0, "save_ckpt_interval": 99}, "cli": {"weight": "a",
                                                                                          "save_path": "y"}}
    assert config_differences(saved, same, ("train.save_ckpt_interval",)) == []
    changed = {**same, "lora": {"rank": 8}}
    assert config_differences(saved, changed, ("train.save_ckpt_interval",)) == ["lora.rank: 4 then, 8 now"]


def test_state_files_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        folder = _save(tmp_path, 2)
    finally:
        os.umask(previous)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in folder.iterdir())
    shutil.rmtree(folder)


# A child process writes a good state at step 2, then the state of step 4, and is SIGKILLed in the
# middle of that write: at a fixed point (after a given file is complete), or at a random moment
# while a large array is being written.
_WRITER = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
import gm.train_state as ts

root, stop_after, big = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
meta, config = {"loss_before": 0.5, "skipped": {"total": 0, "in_a_row": 0}}, "lora:\n  rank: 4\n"
ts.save_state(root, 2, {"w": np.full((4, 8), 2, np.float32)}, meta, config)
synced = ts.fsync_path

def stall(path):  # the kill lands here, right after `stop_after` is complete on disk
    synced(path)
    if Path(path).name == stop_after:
        (root / "stalled").write_text(str(path))
        time.sleep(600)

ts.fsync_path = stall
arrays = {"w": np.full((big, 1024), 4, np.float32)}
(root / "writing").write_text("")
ts.save_state(root, 4, arrays, meta, config)
(root / "done").write_text("")
"""


@pytest.mark.parametrize("stop_after", ["train_state.safetensors", "state.json", "manifest.json", "random"])
def test_a_kill_during_a_state_write_resumes_from_the_previous_good_state(tmp_path, stop_after):
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    big = 64 * 1024 if stop_after == "random" else 4  # 256 MB: the write takes a while
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(repo), str(tmp_path), stop_after, str(big)])
    marker = tmp_path / ("writing" if stop_after == "random" else "stalled")
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert marker.exists(), f"the writer ended (exit {child.returncode}) before the point to kill"
    if stop_after == "random":
        time.sleep(random.uniform(0, 0.5))
    child.send_signal(signal.SIGKILL)
    child.wait()
    found = find_state(tmp_path, "latest")
    if (tmp_path / "done").exists() or found.name == "step_000004":  # the random kill came after the rename
        assert stop_after == "random" and verify_state(found) is None
        return
    assert [p.name for p in state_folders(tmp_path)] == ["step_000002"] and found.name == "step_000002"
    np.testing.assert_array_equal(load_state(found).arrays["w"], np.full((4, 8), 2, np.float32))
    if stop_after != "random":  # the torn write, under its temporary name
        assert list((tmp_path / "state").glob(".step_000004.*"))
    prune_states(tmp_path, None)
    prune_states(tmp_path, 3)  # the next save's pruning removes it
    assert not list((tmp_path / "state").glob(".step_*")) and verify_state(found) is None
