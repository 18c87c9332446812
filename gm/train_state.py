"""Training-state checkpoints: everything a killed run needs to continue exactly.

``<save_path>/state/step_NNNNNN/`` holds

- ``train_state.safetensors``: every Parameter the train step updates (LoRA factors, AdamW
  moments, its update counter, the loss scale and its growth tracker), fp32, by name;
- ``state.json``: the optimizer-step count, the fixed-noise loss before training, skipped-step
  counters and the versions that wrote it;
- ``config.yaml``: the resolved training config of the run;
- ``manifest.json``, written last: the sha256 and size of each file above.

Nothing else needs saving: data order, crops, flips and every noise draw are functions of
(seed, sample position) (``gm.data.dreambooth``, ``gm.training.per_sample_draws``) and the
learning rate a function of the step, so restoring the parameters at step N puts every random
stream at step N.

Writes are atomic: the folder is filled under a temporary name (each file fsynced), then renamed;
a folder whose manifest does not verify (a torn write, a disk error) is skipped with a warning
naming it, and the previous good state is used. ``prune`` keeps the newest N and never the
newest good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from gm.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from gm.errors import ConfigError
from gm.fs import current_umask, fsync_path

_logger = logging.getLogger(__name__)

STATE_DIR = "state"
ARRAYS_FILE = "train_state.safetensors"
META_FILE = "state.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class TrainState:
    """A verified state folder, read back."""

    path: Path
    step: int
    arrays: Dict[str, np.ndarray]
    meta: Dict[str, object]
    config_text: str


def state_root(save_path: str | os.PathLike) -> Path:
    return Path(save_path) / STATE_DIR


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_state(save_path: str | os.PathLike, step: int, arrays: Mapping[str, np.ndarray],
               meta: Mapping[str, object], config_text: str) -> Path:
    """Write the state after ``step`` optimizer steps; returns its folder. Atomic (see module doc)."""
    root = state_root(save_path)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=root))
    try:
        save_safetensors(tmp / ARRAYS_FILE, {k: np.asarray(v) for k, v in arrays.items()},
                         metadata={"step": str(step)})
        (tmp / META_FILE).write_text(json.dumps({"version": STATE_VERSION, "step": step, **meta}, indent=1))
        (tmp / CONFIG_FILE).write_text(config_text)
        files = {}
        for name in (ARRAYS_FILE, META_FILE, CONFIG_FILE):
            fsync_path(tmp / name)
            files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1))
        fsync_path(tmp / MANIFEST_FILE)
        os.chmod(tmp, 0o777 & ~current_umask())
        if final.exists():  # the same step written by an earlier attempt of this run
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_state(folder: Path) -> Optional[str]:
    """None if ``folder``'s manifest verifies, else what is wrong (one phrase)."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return "manifest.json is not readable"
    for name in (ARRAYS_FILE, META_FILE, CONFIG_FILE):
        entry = files.get(name)
        path = folder / name
        if entry is None or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its sha256 in manifest.json"
    return None


def state_folders(save_path: str | os.PathLike) -> List[Path]:
    """Finished state folders (``step_NNNNNN``), oldest first; temporary ones are not listed."""
    root = state_root(save_path)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_state(save_path: str | os.PathLike, spec: str) -> Path:
    """The state folder ``--resume_from_checkpoint spec`` names: ``latest`` (the newest that
    verifies; bad ones skipped with a warning) or a folder path (must verify)."""
    if spec != "latest":
        folder = Path(spec)
        if not folder.is_dir():
            raise ConfigError(f"--resume_from_checkpoint {spec}: no such state folder (give 'latest' or "
                              f"{state_root(save_path)}/step_NNNNNN)")
        problem = verify_state(folder)
        if problem:
            raise ConfigError(f"--resume_from_checkpoint {spec}: {problem}; resume from another state folder")
        return folder
    for folder in reversed(state_folders(save_path)):
        problem = verify_state(folder)
        if problem is None:
            return folder
        _logger.warning("skipping training state %s: %s", folder, problem)
    raise ConfigError(f"--resume_from_checkpoint latest: no complete training state in {state_root(save_path)}; "
                      "start a new run without the flag")


def load_state(folder: Path) -> TrainState:
    """Read a verified state folder."""
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("version") != STATE_VERSION:
        raise ConfigError(f"{folder}: training state version {meta.get('version')}, this code reads "
                          f"{STATE_VERSION}")
    source = SafetensorsFile(folder / ARRAYS_FILE)
    return TrainState(path=folder, step=int(meta["step"]), arrays={k: source[k] for k in source}, meta=meta,
                      config_text=(folder / CONFIG_FILE).read_text())


def prune_states(save_path: str | os.PathLike, keep: Optional[int]) -> List[Path]:
    """Delete all but the newest ``keep`` verified states (None keeps all); unverified folders
    older than the newest good one go too. Never deletes the newest good state. Returns the deleted."""
    if keep is None:
        return []
    folders = state_folders(save_path)
    good = [f for f in folders if verify_state(f) is None]
    keep_set = set(good[-max(keep, 1):])
    newest_good = good[-1] if good else None
    deleted = []
    for folder in folders:
        if folder in keep_set or newest_good is None or folder.name > newest_good.name:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    for leftover in state_root(save_path).glob(".step_*"):  # temporary folders of killed writes
        shutil.rmtree(leftover, ignore_errors=True)
    return deleted
