"""The ``--save_path`` of a training run: who owns it, what a resume keeps, what an overwrite clears.

A run never destroys another run's output. A folder holding a run's files is refused unless the
user continues it (``--resume_from_checkpoint``) or replaces it (``--overwrite``). A resume
rewinds the folder to the state it continues from: log records, LoRA checkpoints and validation
images the killed run wrote after that state are removed, so the finished folder is the one an
uninterrupted run writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, List, Mapping, Tuple

from omegaconf import OmegaConf

from gm.errors import ConfigError, UserError
from gm.fs import atomic_write_text

_logger = logging.getLogger(__name__)

# what train_dreambooth.py writes into --save_path
RUN_FILES = ("config.yaml", "train_log.jsonl", "summary.json", "eval_before.npz", "before_after.png",
             "best_lora.safetensors", "metrics.png")
RUN_FOLDERS = ("checkpoints", "state", "samples")
LOG_FILE = "train_log.jsonl"
_STEP = re.compile(r"step(?:_)?(\d{6,})")


def run_entries(save_path: Path) -> List[str]:
    """The run outputs present in ``save_path``."""
    found = [name for name in RUN_FILES if (save_path / name).is_file()]
    found += [name for name in RUN_FOLDERS if (save_path / name).is_dir() and any((save_path / name).iterdir())]
    return found


def check_save_path(save_path: Path, resume: bool, overwrite: bool) -> None:
    """Before anything is built: ``--save_path`` is a writable folder (or can be made) and holds
    no other run unless resumed or overwritten."""
    if save_path.exists() and not save_path.is_dir():
        raise ConfigError(f"--save_path {save_path}: is a file; give a folder")
    if resume and overwrite:
        raise ConfigError("--resume_from_checkpoint and --overwrite exclude each other: continue the run or "
                          "replace it")
    existing = run_entries(save_path) if save_path.is_dir() else []
    if existing and not resume and not overwrite:
        raise ConfigError(f"--save_path {save_path} already holds a training run ({', '.join(existing)}): "
                          "continue it with --resume_from_checkpoint latest, choose a new --save_path, or "
                          "replace it with --overwrite")
    probe_writable(save_path, "--save_path")


def probe_writable(folder: Path, flag: str) -> None:
    """Write, sync and delete a small file in ``folder`` (or, when it does not exist yet, in its
    nearest existing parent; nothing is created): a read-only or full disk shows up now, in one
    line, not after hours of training."""
    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise ConfigError(f"{flag} {folder}: {target} is not a folder")
    probe = target / f".write_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise ConfigError(f"{flag} {folder}: cannot write there ({err.strerror or err}); free some space or "
                          "choose another folder") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def clear_run(save_path: Path) -> List[str]:
    """``--overwrite``: remove the previous run's outputs (only those; other files stay)."""
    removed = run_entries(save_path)
    for name in removed:
        target = save_path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return removed


def _step_of(name: str) -> int | None:
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


def rewind_run(save_path: Path, step: int) -> int:
    """Drop what a killed run wrote after ``step``: later log records (and a torn last line), LoRA
    checkpoints, validation images, the summary. Returns how many log records were kept."""
    log = save_path / LOG_FILE
    kept: List[str] = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        atomic_write_text(log, "".join(f"{line}\n" for line in kept))
    for folder in ("checkpoints", "samples"):
        root = save_path / folder
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            found = _step_of(entry.name)
            if found is not None and found > step:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (save_path / "summary.json").unlink(missing_ok=True)
    return len(kept)


def config_changes(saved: Any, current: Any, ignore: frozenset = frozenset(),
                   prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every leaf that differs between two plain
    containers (dicts of dicts and values), skipping the dotted keys in ``ignore``."""
    if prefix in ignore:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key in sorted(set(saved) | set(current))
                for change in config_changes(saved.get(key), current.get(key), ignore,
                                             f"{prefix}.{key}" if prefix else str(key))]
    return [] if saved == current else [(prefix, saved, current)]


def config_differences(saved_text: str, current: Mapping[str, Any], allowed: tuple) -> List[str]:
    """Keys whose values differ between a saved run config (YAML text) and the current one,
    ignoring ``allowed`` (dotted keys) and the command line's output-only flags."""
    saved = OmegaConf.to_container(OmegaConf.create(saved_text), resolve=True)
    # flags that name outputs or the way in, not the trained numbers (the caller passes the rest)
    ignore = frozenset(allowed) | {"cli.resume_from_checkpoint", "cli.overwrite", "cli.init_lora",
                                   "cli.compile_cache", "cli.compile_helper", "cli.input_cache",
                                   "cli.save_path"}
    changes = config_changes(saved, json.loads(json.dumps(dict(current))), ignore)
    return [f"{key}: {then!r} then, {now!r} now" for key, then, now in changes]


class TrainingStopped(UserError):
    """Training cannot go on (e.g. too many skipped steps); the last good state is intact."""
