"""Load SDXL weights into our models: official single file, diffusers folder, MindSpore .ckpt.

Our parameter names *are* the official single-file keys (``model.diffusion_model.*``,
``first_stage_model.*``, ``conditioner.embedders.{0,1}.*``), so a single file or a ckpt written
by ``tools/convert_weights.py`` loads by name; a diffusers folder is mapped per component by the
rules derived from the model itself (``diffusers_*.py``). Every route checks the complete key
set and every shape before a single parameter is touched, and fails with one line that counts
the missing and unexpected keys.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn

from gm.checkpoint.ckpt_io import read_ckpt_file
from gm.checkpoint.errors import CheckpointError, summarize_keys
from gm.checkpoint.keymap import KeyRule, apply_rules, check_rules, iter_rules, rename, rule_shapes
from gm.checkpoint.prediction_type import (
    MARKER_KEYS,
    declared_in_diffusers_folder,
    declared_in_single_file,
)
from gm.checkpoint.prediction_type import resolve as resolve_prediction_type
from gm.checkpoint.reference_names import to_official_names, uses_reference_names
from gm.checkpoint.safetensors_io import MergedSource, SafetensorsFile

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Component:
    """One model part: its diffusers subfolder, its official key prefix and its key-map module."""

    name: str
    prefix: str
    rules_module: str
    rules_function: str = "rules"
    tokenizer_subfolder: str = ""  # diffusers folder holding this text encoder's tokenizer


COMPONENTS: Dict[str, Component] = {
    c.name: c
    for c in (
        Component("unet", "model.diffusion_model.", "gm.checkpoint.diffusers_unet"),
        Component("vae", "first_stage_model.", "gm.checkpoint.diffusers_vae"),
        Component("text_encoder", "conditioner.embedders.0.", "gm.checkpoint.diffusers_text", "rules_clip_l",
                  "tokenizer"),
        Component("text_encoder_2", "conditioner.embedders.1.", "gm.checkpoint.diffusers_text", "rules_open_clip_g",
                  "tokenizer_2"),
    )
}

# Buffers that official files and older transformers exports carry but that are not parameters.
_IGNORED_SINGLE_FILE_SUFFIXES = ("position_ids",)


def _component(name: str) -> Component:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component '{name}'; expected one of {sorted(COMPONENTS)}")
    return COMPONENTS[name]


def diffusers_rules(component: str, cell: nn.Cell) -> Tuple[List[KeyRule], Tuple[str, ...], Tuple[str, ...]]:
    """(rules, ignored source keys, optional targets) mapping a diffusers component onto ``cell``."""
    comp = _component(component)
    module = importlib.import_module(comp.rules_module)
    rules = getattr(module, comp.rules_function)(cell)
    ignored = _per_component(getattr(module, "IGNORED_SOURCE_KEYS", ()), component)
    optional = _per_component(getattr(module, "OPTIONAL_TARGETS", ()), component)
    return rules, ignored, optional


def diffusers_source(component: str, source: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``source`` in the key layout the component's rules expect.

    A rules module may define ``adapt_source(component, source)`` for exporters that lay out the
    same tensors differently (transformers >= 5 saves ``CLIPTextModel`` without ``text_model.``).
    """
    module = importlib.import_module(_component(component).rules_module)
    adapt = getattr(module, "adapt_source", None)
    return adapt(component, source) if adapt is not None else source


def _per_component(value, component: str) -> Tuple[str, ...]:
    # a module serving several components keeps one tuple per component in a dict
    if isinstance(value, Mapping):
        value = value.get(component, ())
    return tuple(value)


def parameters_of(cell: nn.Cell) -> Dict[str, ms.Parameter]:
    """Our parameter names (relative to ``cell``) -> Parameter."""
    return dict(cell.parameters_and_names())


def checked_arrays(cell: nn.Cell, rules: Sequence[KeyRule], source: Mapping[str, np.ndarray], *, what: str,
                   ignored: Iterable[str] = (), optional: Iterable[str] = ()) -> Iterator[Tuple[str, np.ndarray]]:
    """Check keys and shapes of ``source`` against ``rules`` for ``cell`` (eagerly, before
    anything is yielded), then yield ``(our name, array)`` one tensor at a time."""
    params = parameters_of(cell)
    not_ours = {r.target for r in rules} - set(params)
    assert not not_ours, f"key-map rules name parameters the model lacks: {sorted(not_ours)[:5]}"
    check_rules(rules, source.keys(), what=what, ignore_unused=ignored, optional_targets=optional)
    shapes = rule_shapes(rules, {k: _shape_of(source, k) for r in rules for k in r.sources if k in source})
    wrong = [f"{t} ours {tuple(params[t].shape)} vs file {s}" for t, s in shapes.items() if tuple(params[t].shape) != s]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} tensors have the wrong shape (first: {'; '.join(wrong[:3])}) "
                              "-- the checkpoint is for another model size; check --config")
    return iter_rules(rules, source)


def assign_parameters(cell: nn.Cell, named_arrays: Iterable[Tuple[str, np.ndarray]]) -> int:
    """Copy arrays into ``cell``'s parameters (cast to each parameter's dtype); returns the count."""
    params = parameters_of(cell)
    count = 0
    for name, value in named_arrays:
        param = params[name]
        param.set_data(ms.Tensor(np.asarray(value), dtype=param.dtype))
        count += 1
    return count


def _shape_of(source: Mapping[str, np.ndarray], key: str) -> Tuple[int, ...]:
    shape = getattr(source, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(np.shape(source[key]))


# ----------------------------------------------------------------------------------------------
# file and folder readers


def read_diffusers_component(folder: str | os.PathLike) -> MergedSource:
    """All tensors of one diffusers/transformers component folder (single or sharded safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (expected a diffusers component folder)")
    files = _pick_safetensors(folder)
    return MergedSource([SafetensorsFile(f) for f in files])


def _pick_safetensors(folder: Path) -> List[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text()).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    # diffusers "variants" (model.fp16.safetensors) sit beside the full-precision file: prefer the latter
    plain = [f for f in files if f.name.count(".") == 1] or files
    if len(plain) > 1:
        raise CheckpointError(f"{folder}: several weight files ({', '.join(f.name for f in plain)}) and no "
                              "*.safetensors.index.json; keep one")
    if plain:
        return plain
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: holds only pickle-based .bin weights, which we never load; "
                              "re-save it with safe_serialization=True or use the .safetensors variant")
    raise CheckpointError(f"{folder}: no .safetensors weights found")


def read_ckpt(path: str | os.PathLike) -> Dict[str, np.ndarray]:
    """A MindSpore .ckpt (protobuf, not pickle) as ``name -> np.ndarray``."""
    arrays, strings = read_ckpt_file(path)
    if strings:  # save_checkpoint(append_dict=...) entries, e.g. a LoRA file's metadata
        raise CheckpointError(f"{path}: holds non-tensor entries ({', '.join(sorted(strings)[:3])}) -- a LoRA file? "
                              "give it after the base weights: --weight base,lora")
    return arrays


class _PrefixView(Mapping[str, np.ndarray]):
    """The keys of ``source`` under ``prefix``, with the prefix removed."""

    def __init__(self, source: Mapping[str, np.ndarray], prefix: str):
        self._source, self._prefix = source, prefix
        self._keys = [k[len(prefix):] for k in source if k.startswith(prefix)]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._source[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        return _shape_of(self._source, self._prefix + key)


class _NamedSource(dict):
    """A dict of arrays that remembers the file it came from (for error messages)."""

    def __init__(self, data: Mapping[str, np.ndarray], path: Path):
        super().__init__(data)
        self.path = path


def read_weight_file(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """An official-format ``.safetensors`` or a MindSpore ``.ckpt`` as a name -> array mapping."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return read_ckpt(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    raise CheckpointError(f"{path}: unsupported weight file; give an official .safetensors single file, "
                          "a MindSpore .ckpt or a diffusers folder")


# ----------------------------------------------------------------------------------------------
# one component


def load_diffusers_component(cell: nn.Cell, folder: str | os.PathLike, component: str) -> int:
    """Load a diffusers/transformers component folder (``unet/``, ``vae/``, ...) into ``cell``."""
    return assign_parameters(cell, diffusers_component_arrays(cell, folder, component))


def diffusers_component_arrays(cell: nn.Cell, folder: str | os.PathLike,
                               component: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Checked ``(our name, array)`` pairs of a diffusers component folder for ``cell``."""
    rules, ignored, optional = diffusers_rules(component, cell)
    source = diffusers_source(component, read_diffusers_component(folder))
    return checked_arrays(cell, rules, source, what=f"{folder}", ignored=ignored, optional=optional)


def identity_rules(cell: nn.Cell) -> List[KeyRule]:
    """Official names are our names: one ``rename(n, n)`` per parameter of ``cell``."""
    return [rename(name, name) for name in parameters_of(cell)]


def load_single_file_component(cell: nn.Cell, path: str | os.PathLike | Mapping, component: str) -> int:
    """Load the keys under ``component``'s official prefix of a single file (or a ckpt) into ``cell``."""
    return assign_parameters(cell, single_file_component_arrays(cell, path, component))


def single_file_component_arrays(cell: nn.Cell, path: str | os.PathLike | Mapping,
                                 component: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Checked ``(our name, array)`` pairs of one component of a single file (path or mapping)."""
    comp = _component(component)
    source = path if isinstance(path, Mapping) else read_weight_file(path)
    name = getattr(source, "path", path if not isinstance(path, Mapping) else "checkpoint")
    view = _PrefixView(source, comp.prefix)
    if not len(view):
        raise CheckpointError(f"{name}: no keys under '{comp.prefix}' -- not an SDXL single-file checkpoint?")
    ignored = [k for k in view if k.endswith(_IGNORED_SINGLE_FILE_SUFFIXES)]
    # parameters a diffusers export lacks (OpenCLIP's unused logit_scale) may be absent here too
    _, _, optional = diffusers_rules(component, cell)
    return checked_arrays(cell, identity_rules(cell), view, what=f"{name} [{comp.prefix}*]", ignored=ignored,
                          optional=optional)


def single_file_state_from_diffusers(component: str, cell: nn.Cell,
                                     diffusers_state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The official single-file keys and arrays of one component, made from its diffusers state."""
    comp = _component(component)
    rules, ignored, optional = diffusers_rules(component, cell)
    ours = apply_rules(rules, diffusers_source(component, diffusers_state), what=f"diffusers {component}",
                       ignore_unused=ignored, optional_targets=optional)
    return {comp.prefix + name: value for name, value in ours.items()}


# ----------------------------------------------------------------------------------------------
# the whole engine


def component_cell(engine: nn.Cell, component: str) -> nn.Cell:
    """The sub-cell of ``engine`` at the component's official prefix (e.g. ``conditioner.embedders.1``)."""
    cell = engine
    for part in _component(component).prefix.rstrip(".").split("."):
        cell = cell[int(part)] if part.isdigit() else getattr(cell, part)
    return cell


def open_weight_file(engine: nn.Cell, path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """A single file or ``.ckpt`` as official name -> array (a reference-converter ``.ckpt``'s
    MindSpore names translated), read once for both the arrays and the prediction type."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    source = read_weight_file(path)
    if path.suffix == ".ckpt" and uses_reference_names(source):
        # the reference's converter (mindone ``*_ms.ckpt``): MindSpore's norm/embedding names
        source = to_official_names(engine, source)
    if isinstance(source, dict):
        source = _NamedSource(source, path)
    return source


def declared_prediction_type(path: str | os.PathLike, source: Optional[Mapping[str, np.ndarray]] = None
                             ) -> Optional[str]:
    """``epsilon``/``v_prediction`` as the weights at ``path`` declare it, None when they do not
    (``gm.checkpoint.prediction_type``); ``source``: the file, when already open."""
    path = Path(path)
    if path.is_dir():
        return declared_in_diffusers_folder(path)
    if source is None:
        # a safetensors header is read, not its tensors; a .ckpt's marker entries only
        source = read_ckpt_markers(path) if path.suffix == ".ckpt" else read_weight_file(path)
    return declared_in_single_file(source, getattr(source, "metadata", {}), path)


def read_ckpt_markers(path: Path) -> Dict[str, np.ndarray]:
    """The prediction-type marker entries of a ``.ckpt`` (none: an empty dict)."""
    arrays, _ = read_ckpt_file(path, names=MARKER_KEYS)
    return arrays


def weight_arrays(engine: nn.Cell, path: str | os.PathLike,
                  source: Optional[Mapping[str, np.ndarray]] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """Checked ``(official name, array)`` pairs for the whole engine from any supported source.

    ``path``: the official single file (``sd_xl_base_1.0.safetensors``), a diffusers folder
    (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``) or a ``.ckpt`` from
    ``tools/convert_weights.py`` or from the reference's converter (``sd_xl_base_1.0_ms.ckpt``);
    ``source``: that file from ``open_weight_file``, when already open. Every component is checked
    before the first array is yielded; a file's prediction-type marker (``v_pred``) is not an array
    of the model.
    """
    path = Path(path)
    if path.is_dir():
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise CheckpointError(f"{path}: not a diffusers SDXL folder (missing {', '.join(missing)}/)")
        parts = [(c, diffusers_component_arrays(component_cell(engine, c), path / c, c)) for c in COMPONENTS]
    else:
        source = open_weight_file(engine, path) if source is None else source
        prefixes = tuple(c.prefix for c in COMPONENTS.values())
        stray = [k for k in source if not k.startswith(prefixes) and k not in MARKER_KEYS]
        if stray:
            raise CheckpointError(f"{path}: unexpected keys {summarize_keys(stray)} -- not an SDXL base checkpoint?")
        parts = [(c, single_file_component_arrays(component_cell(engine, c), source, c)) for c in COMPONENTS]
    for component, arrays in parts:
        prefix = COMPONENTS[component].prefix
        for name, value in arrays:
            yield prefix + name, value


def load_weights(engine: nn.Cell, path: str | os.PathLike, prediction_type: Optional[str] = None) -> str:
    """Load SDXL base weights into a DiffusionEngine (see ``weight_arrays`` for the sources) and
    precondition for what its UNet predicts; returns that prediction type.

    ``prediction_type`` (``--prediction_type``) wins; else what the weights declare (a ``v_pred``
    key, ModelSpec's header entry, a diffusers scheduler config); else the engine's config.
    fp16/bf16 files are cast to each parameter's dtype. Nothing is assigned if any check fails.
    """
    path = Path(path)
    source = None if path.is_dir() else open_weight_file(engine, path)
    declared = declared_prediction_type(path, source)
    arrays = weight_arrays(engine, path, source)
    first = next(arrays, None)  # runs every check before any parameter changes
    if first is not None:
        assign_parameters(engine, itertools.chain([first], arrays))
    if path.is_dir():
        use_folder_tokenizers(engine, path)
    chosen = resolve_prediction_type(declared, prediction_type, path)
    if chosen and chosen != engine.denoiser.scaling.prediction_type:
        engine.denoiser.set_prediction_type(chosen)
    _logger.info("loaded base weights from %s (%s)", path, engine.denoiser.scaling.prediction_type)
    return engine.denoiser.scaling.prediction_type


def use_folder_tokenizers(engine: nn.Cell, folder: Path) -> None:
    """Tokenize with a diffusers folder's ``tokenizer/`` and ``tokenizer_2/`` when it has them
    (the same vocabulary as the shipped one for SDXL base, but a folder may carry added tokens)."""
    from gm.modules.embedders.tokenizer import CLIPTextTokenizer

    for comp in COMPONENTS.values():
        sub = folder / comp.tokenizer_subfolder if comp.tokenizer_subfolder else None
        if sub is not None and sub.is_dir():
            embedder = component_cell(engine, comp.name)
            old = embedder.tokenizer
            tokenizer = CLIPTextTokenizer(old.pad_token, old.max_length, sub)
            _ = tokenizer.hf_tokenizer  # read the files now, while the folder is known to exist
            embedder.tokenizer = tokenizer


def engine_state(engine: nn.Cell) -> Dict[str, np.ndarray]:
    """All parameters of ``engine`` under their official single-file names."""
    return {name: param.asnumpy() for name, param in parameters_of(engine).items()}
