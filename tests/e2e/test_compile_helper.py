"""On a cold compile cache a standalone CPU run compiles its train step in a helper process and
loads it from the cache: the same losses and LoRA as a run that compiles in-process, and a warm
rerun needs no helper."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "dreambooth"
STEPS = 3


def _train(root: Path, name: str, *extra: str):
    save = root / name
    cmd = [sys.executable, "train_dreambooth.py", "--instance_data_path", str(SHARED / "dog"),
           "--instance_prompt", "a photo of sks dog", "--class_data_path", str(SHARED / "dog6"),
           "--class_prompt", "a photo of a dog", "--num_class_images", "2", "--max_train_steps", str(STEPS),
           "--validation_prompt", "", "--input_cache", str(root / "inputs"), "--save_path", str(save), *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((save / "summary.json").read_text())
    return result.stderr, [(r["loss"], r["grad_norm"]) for r in records], summary


def test_cold_cache_run_compiles_in_a_helper_and_trains_exactly_as_in_process(tmp_path):
    if not (SHARED / "dog").is_dir():
        pytest.skip(f"{SHARED} not found (../shared beside the checkout)")
    cache = tmp_path / "compile"
    log, losses, summary = _train(tmp_path, "helper", "--compile_cache", str(cache))
    assert "train step compiled in a helper process" in log
    (folder,) = cache.iterdir()
    assert "train step compiled in" in (folder / "compile_helper.log").read_text()

    in_process_log, in_process, in_process_summary = _train(tmp_path, "in_process", "--compile_cache", "off")
    assert "helper" not in in_process_log
    assert losses == in_process and len(losses) == STEPS
    assert summary["lora_sha256_per_rank"] == in_process_summary["lora_sha256_per_rank"]
    assert summary["fixed_noise_instance_loss_before"] == in_process_summary["fixed_noise_instance_loss_before"]

    warm_log, warm, _ = _train(tmp_path, "warm", "--compile_cache", str(cache))
    assert "helper" not in warm_log and warm == losses
