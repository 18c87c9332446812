"""What a weights source says its UNet predicts (epsilon or v), and how our files say it.

SDXL base predicts the noise; v-prediction SDXL fine-tunes (and this project's toy-world base)
predict the velocity, and sampling or training one with the other's preconditioning draws noise.
The conventions read here are the ones other tools write and read:
- a single file (or a ``.ckpt``) with a ``v_pred`` key is v-prediction (ComfyUI's marker: readers
  test the key, not its value; v-prediction SDXL checkpoints carry it); ``ztsnr`` beside it means a zero-terminal-SNR
  schedule, which this project does not implement;
- ``modelspec.prediction_type`` in a safetensors header: ``epsilon`` or ``v`` (Stability's ModelSpec,
  written by kohya's scripts);
- a diffusers folder: ``prediction_type`` of ``scheduler/scheduler_config.json``.
A file that says nothing is what its config says (``denoiser_config.params.scaling_config``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np

from gm.checkpoint.errors import CheckpointError
from gm.modules.diffusionmodules.denoiser_scaling import PREDICTION_TYPES

_logger = logging.getLogger(__name__)

V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"
MARKER_KEYS = (V_PRED_MARKER, ZTSNR_MARKER)
# ModelSpec's names (modelspec.prediction_type) for ours
MODELSPEC_NAMES = {"epsilon": "epsilon", "v_prediction": "v"}
_FROM_MODELSPEC = {theirs: ours for ours, theirs in MODELSPEC_NAMES.items()}


def declared_in_single_file(source: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                            name: str | os.PathLike) -> Optional[str]:
    """The prediction type a single file's keys or header declare, or None when they do not."""
    if ZTSNR_MARKER in source:
        raise CheckpointError(f"{name}: a zero-terminal-SNR checkpoint ('{ZTSNR_MARKER}' key); its noise schedule "
                              "is not implemented here, so it would sample wrongly")
    if V_PRED_MARKER in source:
        return "v_prediction"
    spec = metadata.get("modelspec.prediction_type")
    if spec is not None and spec not in _FROM_MODELSPEC:
        raise CheckpointError(f"{name}: header modelspec.prediction_type '{spec}' is not epsilon or v")
    return _FROM_MODELSPEC.get(spec)


def declared_in_diffusers_folder(folder: str | os.PathLike) -> Optional[str]:
    """``prediction_type`` of a diffusers folder's scheduler config, or None without one."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("prediction_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable scheduler config ({err})") from None
    if value is None:
        return None
    if value not in PREDICTION_TYPES:
        raise CheckpointError(f"{path}: prediction_type '{value}' is not one of {', '.join(PREDICTION_TYPES)}")
    return value


def marker_arrays(prediction_type: str) -> Dict[str, np.ndarray]:
    """The keys a single file we write carries for ``prediction_type`` (none for epsilon, SDXL base's)."""
    # one element, not ComfyUI's empty tensor: a MindSpore .ckpt drops empty tensors when saved
    return {V_PRED_MARKER: np.zeros((1,), np.float32)} if prediction_type == "v_prediction" else {}


def marker_metadata(prediction_type: str) -> Dict[str, str]:
    """The safetensors header entry that names ``prediction_type`` (ModelSpec)."""
    return {"modelspec.prediction_type": MODELSPEC_NAMES[prediction_type]}


def resolve(declared: Optional[str], requested: Optional[str], source: str | os.PathLike) -> Optional[str]:
    """The prediction type to use: ``requested`` (``--prediction_type``) over what the weights at
    ``source`` ``declared``; None when neither says (the model config's then holds)."""
    if requested and declared and requested != declared:
        _logger.warning("--prediction_type %s overrides the %s that %s declares", requested, declared, source)
    return requested or declared
