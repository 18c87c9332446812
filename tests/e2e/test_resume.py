"""A training run killed with SIGKILL at a random step and resumed with
``--resume_from_checkpoint latest`` finishes with the LoRA, log and validation images of an
uninterrupted run (graph mode, tiny config, prior preservation, gradient accumulation 2); a
second run into the same --save_path is refused, and so is a resume with other settings.

The killed run competes with a busy process for the cores and the resume is bound
to one core (``taskset -c 0``): the result is still bit-identical to the uninterrupted run's, so
neither the load nor the core binding changes the numbers."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gm.checkpoint.lora import read_lora_file

DOG = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambooth" / "dog"
REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 6, 2


def _args(tiny_weights, class_dir, save):
    return ["train_dreambooth.py", "--weight", str(tiny_weights.single_file), "--instance_data_path", str(DOG),
            "--instance_prompt", "a photo of sks dog", "--class_data_path", str(class_dir),
            "--class_prompt", "a photo of a dog", "--num_class_images", "2", "--sample_batch_size", "2",
            "--sample_steps", "2", "--max_train_steps", str(STEPS), "--gradient_accumulation_steps", "2",
            "--save_ckpt_interval", str(EVERY), "--validation_steps", "3", "--learning_rate", "1e-3",
            "--save_path", str(save)]


def _run(args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tiny_weights, tmp_path_factory):
    if not DOG.is_dir():
        pytest.skip(f"{DOG} not found (../shared beside the checkout)")
    root = tmp_path_factory.mktemp("resume")
    result = _run(_args(tiny_weights, root / "class_dog", root / "full"))
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def _log(save):
    return [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]


def _files(save):
    return sorted(str(p.relative_to(save)) for p in save.rglob("*") if p.is_file() and "state" not in p.parts)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_weights, uninterrupted):
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(EVERY + 1, STEPS - 1)  # a state exists, the run is not done
    save = uninterrupted / f"killed_{seed}"
    stderr = uninterrupted / f"killed_{seed}.log"  # a file, not a pipe: a full pipe would stall the run
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a competing CPU load
    try:
        with open(stderr, "w") as err:
            process = subprocess.Popen([sys.executable, *_args(tiny_weights, uninterrupted / "class_dog", save)],
                                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            log = save / "train_log.jsonl"
            if log.is_file() and f'"step": {kill_after},' in log.read_text():
                break
            time.sleep(0.05)
        assert process.poll() is None, f"(seed {seed}) ended before step {kill_after}: {stderr.read_text()[-3000:]}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        busy.kill()
        busy.wait()
    assert len(_log(save)) >= kill_after and not (save / "summary.json").exists()

    one_core = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    resumed = subprocess.run([*one_core, sys.executable, *_args(tiny_weights, uninterrupted / "class_dog", save),
                              "--resume_from_checkpoint", "latest"], cwd=REPO, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, f"(seed {seed}) {resumed.stderr[-4000:]}"
    full = uninterrupted / "full"
    summary = json.loads((save / "summary.json").read_text())
    assert summary["resumed_from_step"] in range(EVERY, kill_after + 1, EVERY), (seed, summary)
    # the same final LoRA (bit for bit on one machine; 1e-6 is the bound)
    ours, _ = read_lora_file(save / "checkpoints" / f"sdxl_lora_step{STEPS:06d}_lora.ckpt")
    reference, _ = read_lora_file(full / "checkpoints" / f"sdxl_lora_step{STEPS:06d}_lora.ckpt")
    assert sorted(ours) == sorted(reference)
    worst = max(float(np.abs(ours[k] - reference[k]).max()) for k in reference)
    assert worst <= 1e-6, f"(seed {seed}, killed after step {kill_after}) LoRA differs by {worst:.2e}"
    # each step logged once, with the uninterrupted run's losses
    log, full_log = _log(save), _log(full)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)), seed
    for ours_record, full_record in zip(log, full_log):
        for key in ("loss", "loss_instance", "loss_class", "lr", "grad_norm", "skipped_steps"):
            assert ours_record[key] == full_record[key], (seed, ours_record["step"], key)
    # the same files (checkpoints rotated the same way, validation images at the same steps, same pixels)
    assert _files(save) == _files(full)
    for name in _files(full):
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(save / name)), np.asarray(Image.open(full / name))), name
        elif name.startswith("checkpoints/") and name.endswith(".safetensors"):
            a, _ = read_lora_file(save / name)
            b, _ = read_lora_file(full / name)
            assert all(np.array_equal(a[k], b[k]) for k in b), name


def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(tiny_weights, uninterrupted):
    full = uninterrupted / "full"
    before = {name: _digest(full / name) for name in _files(full)}
    again = _run(_args(tiny_weights, uninterrupted / "class_dog", full), timeout=120)
    assert again.returncode == 2
    lines = [line for line in again.stderr.strip().splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "already holds a training run" in lines[0] and "--resume_from_checkpoint latest" in \
        lines[0] and "Traceback" not in again.stderr
    assert {name: _digest(full / name) for name in _files(full)} == before


def test_resuming_with_other_settings_is_refused(tiny_weights, uninterrupted):
    args = _args(tiny_weights, uninterrupted / "class_dog", uninterrupted / "full")
    args[args.index("--learning_rate") + 1] = "2e-3"
    result = _run([*args, "--resume_from_checkpoint", "latest"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "other settings (optim.learning_rate: 0.001 then, 0.002 now)" in result.stderr
