"""LoRA files in the formats other tools read and write, converted through one table of names.

Every LoRA module this project can train has one row in ``lora_names(engine)``: our parameter
prefix, the official base weight it adds to (with the row slice for OpenCLIP's packed q/k/v) and
its name in each format. The table is derived from the engine and from the same key maps the
weight loaders use (``gm.checkpoint.diffusers_unet`` / ``diffusers_text``), never typed by hand.

Formats (``detect_format`` tells them apart by their keys):

- ``kohya`` (sd-scripts; loaded by ComfyUI, AUTOMATIC1111/Forge and diffusers):
  ``lora_unet_<official UNet path, . -> _>.lora_down.weight`` (rank, in), ``.lora_up.weight``
  (out, rank), ``.alpha`` (scalar; scale = alpha / rank); text encoders
  ``lora_te1_<transformers CLIP-L path>`` and ``lora_te2_<transformers OpenCLIP-G path>`` (the
  packed q/k/v split into ``q_proj``/``k_proj``/``v_proj``). ``ss_*`` / ``modelspec.*`` metadata.
- ``diffusers`` (PEFT, as ``StableDiffusionXLPipeline.save_lora_weights`` writes it):
  ``unet.<diffusers path>.lora_A.weight`` (= down) / ``.lora_B.weight`` (= up),
  ``text_encoder.<...>``, ``text_encoder_2.<...>``; rank and alpha in the ``lora_adapter_metadata``
  JSON (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``, ...).
- ``gm`` (ours): ``<our parameter prefix>.lora_down.weight`` / ``.lora_up.weight``, the LoRA
  config as metadata (``gm.checkpoint.lora``).
- ``seed`` (mindone's SDXL ``*_lora.ckpt``): ``model.diffusion_model.<path>.lora_A.weight`` /
  ``.lora_B.weight``, UNet only, applied with scale 1 (mindone's default alpha = rank): a scale
  other than 1 is folded into ``lora_B`` on export.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mindspore import nn

from gm.checkpoint.errors import CheckpointError
from gm.checkpoint.load import COMPONENTS, component_cell, diffusers_rules
from gm.modules.lora import (
    LORA_DOWN,
    LORA_UP,
    PACKED_SLICES,
    UNET_PREFIX,
    UNET_TARGET_GROUPS,
    LoRAConfig,
    lora_modules,
    plan_lora,
)

_logger = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers", "gm", "seed")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
DIFFUSERS_ADAPTER_METADATA = "lora_adapter_metadata"
KOHYA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
SEED_DOWN, SEED_UP = "lora_A", "lora_B"
TEXT_ENCODER_GROUP = "text_encoder"


@dataclass(frozen=True)
class LoRAName:
    """One module a LoRA can adapt, named in every format.

    Attributes:
        ours: our parameter prefix (``<ours>.lora_down.weight``), relative to the engine.
        weight: official name of the base weight it adds to; ``rows`` its row slice (packed q/k/v).
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        group: ``--lora_unet_targets`` group (``attn``, ``ff``, ``proj``) or ``text_encoder``.
        runs: False for a text-encoder block SDXL never runs (CLIP-L's last): a LoRA there has no effect.
        kohya, diffusers: the module's name in those formats (without ``.lora_*`` suffixes).
        shape: (in_features, out_features).
    """

    ours: str
    weight: str
    rows: Optional[Tuple[int, int]]
    component: str
    group: str
    runs: bool
    kohya: str
    diffusers: str
    shape: Tuple[int, int]

    @property
    def seed(self) -> str:
        return self.ours


def lora_names(engine: nn.Cell, text_encoders: bool = True) -> List[LoRAName]:
    """Every module of ``engine`` any LoRAConfig can adapt (all UNet groups and, with
    ``text_encoders``, every text-encoder block), with its names in all formats. Works before and
    after ``inject_lora`` (and without the text encoders when ``text_encoders`` is False)."""
    widest = LoRAConfig(rank=1, unet_targets=tuple(UNET_TARGET_GROUPS), text_encoder=text_encoders)
    running = {t.path for t in plan_lora(engine, widest, injected_ok=True)}
    parts = ("unet", "text_encoder", "text_encoder_2") if text_encoders else ("unet",)
    sources = {component: _hf_sources(engine, component) for component in parts}
    names = []
    for target in plan_lora(engine, widest, injected_ok=True, every_layer=True):
        group = _group_of(target.path) if target.component == "unet" else TEXT_ENCODER_GROUP
        slices = [(target.path, f"{target.path}.weight", None)] if target.kind == "linear" else [
            (f"{target.path}.in_proj_{s}", f"{target.path}.in_proj_weight",
             (i * target.out_features, (i + 1) * target.out_features)) for i, s in enumerate(PACKED_SLICES)]
        prefix = COMPONENTS[target.component].prefix
        for ours, weight, rows in slices:
            rule_sources = sources[target.component][weight[len(prefix):]]
            hf_weight = rule_sources[0] if rows is None else rule_sources[rows[0] // (rows[1] - rows[0])]
            hf_module = hf_weight[: -len(".weight")]
            kohya_path = weight[len(prefix): -len(".weight")] if target.component == "unet" else hf_module
            names.append(LoRAName(
                ours=ours, weight=weight, rows=rows, component=target.component, group=group,
                runs=target.path in running,
                kohya=KOHYA_PREFIXES[target.component] + kohya_path.replace(".", "_"),
                diffusers=f"{target.component}.{hf_module}",
                shape=(target.in_features, target.out_features)))
    return names


def _group_of(path: str) -> str:
    relative = path[len(UNET_PREFIX):]
    return next(g for g, patterns in UNET_TARGET_GROUPS.items()
                if any(fnmatch.fnmatchcase(relative, p) for p in patterns))


def _hf_sources(engine: nn.Cell, component: str) -> Dict[str, Tuple[str, ...]]:
    """Our (component-relative) weight name -> the diffusers/transformers keys it is made from."""
    rules, _, _ = diffusers_rules(component, component_cell(engine, component))
    return {rule.target: rule.sources for rule in rules}


# ----------------------------------------------------------------------------------------------
# a format-neutral LoRA: module -> (down, up, alpha)


@dataclass
class LoRAUpdates:
    """A LoRA independent of file format: our module prefix -> (down (rank, in), up (out, rank), alpha).

    ``format`` and ``metadata``: where it came from (for messages and lossless round trips).
    """

    modules: Dict[str, Tuple[np.ndarray, np.ndarray, float]]
    format: str = "gm"
    metadata: Optional[Dict[str, str]] = None

    def __len__(self) -> int:
        return len(self.modules)


def updates_of(engine: nn.Cell) -> LoRAUpdates:
    """The LoRA injected in ``engine`` as ``LoRAUpdates`` (float32 copies)."""
    modules = {}
    for module in lora_modules(engine):
        down = module.cell.lora_down.weight.asnumpy().astype(np.float32)
        up = module.cell.lora_up.weight.asnumpy().astype(np.float32)
        modules[module.name] = (down, up, float(module.alpha))
    return LoRAUpdates(modules)


def detect_format(keys: Sequence[str], metadata: Mapping[str, str]) -> Optional[str]:
    """The format a LoRA file's keys are in, or None when they are no LoRA we know."""
    keys = list(keys)
    if not keys:
        return None
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        if all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
            return "diffusers"
        return "seed"
    if all(k.endswith((f".{LORA_DOWN}.weight", f".{LORA_UP}.weight")) for k in keys):
        return "gm"
    return None


def _scalar(value) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def parse_updates(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                  names: Sequence[LoRAName], fmt: str) -> LoRAUpdates:
    """``arrays`` of a ``fmt`` LoRA file -> ``LoRAUpdates`` under our module names.

    Raises CheckpointError naming ``path`` and the first key that matches no module, a factor
    without its partner, or a shape that does not fit the model.
    """
    if fmt == "kohya":
        # kohya's SDXL trainer names UNet modules by their official path; other tools (and kohya's
        # SD 1.x trainer) by the diffusers path: accept both
        by_name = {**{_kohya_diffusers_path(n): n for n in names}, **{n.kohya: n for n in names}}
        down_suffix, up_suffix = f".{LORA_DOWN}.weight", f".{LORA_UP}.weight"
    elif fmt == "diffusers":
        by_name = {n.diffusers: n for n in names}
        down_suffix, up_suffix = ".lora_A.weight", ".lora_B.weight"
    elif fmt == "seed":
        by_name = {n.seed: n for n in names}
        down_suffix, up_suffix = f".{SEED_DOWN}.weight", f".{SEED_UP}.weight"
    elif fmt == "gm":
        by_name = {n.ours: n for n in names}
        down_suffix, up_suffix = f".{LORA_DOWN}.weight", f".{LORA_UP}.weight"
    else:
        raise CheckpointError(f"{path}: unknown LoRA format '{fmt}'; expected one of {', '.join(FORMATS)}")
    alphas = _alphas(path, metadata, fmt)
    modules: Dict[str, Tuple[np.ndarray, np.ndarray, float]] = {}
    seen = set()
    for key in sorted(arrays):
        if fmt == "kohya" and key.endswith(".alpha"):
            stem = key[: -len(".alpha")]
            if stem not in by_name:
                raise CheckpointError(f"{path}: '{key}' matches no module of this model -- "
                                      f"{_why_no_module(stem)}")
            continue
        if key.endswith(down_suffix):
            stem, partner = key[: -len(down_suffix)], key[: -len(down_suffix)] + up_suffix
        elif key.endswith(up_suffix):
            stem, partner = key[: -len(up_suffix)], key[: -len(up_suffix)] + down_suffix
        else:
            raise CheckpointError(f"{path}: '{key}' is not a LoRA factor of the {fmt} format "
                                  f"(expected *{down_suffix} / *{up_suffix})")
        if stem in seen:
            continue
        seen.add(stem)
        name = by_name.get(stem)
        if name is None and fmt == "diffusers" and stem.startswith("text_encoder.encoder."):
            # transformers >= 5 names CLIPTextModel's modules without the ``text_model.`` level
            name = by_name.get("text_encoder.text_model." + stem[len("text_encoder."):])
        if name is None:
            raise CheckpointError(f"{path}: '{key}' matches no module of this model -- {_why_no_module(stem)}")
        if partner not in arrays:
            raise CheckpointError(f"{path}: '{key}' has no partner '{partner}'")
        down = np.asarray(arrays[stem + down_suffix], dtype=np.float32)
        up = np.asarray(arrays[stem + up_suffix], dtype=np.float32)
        down, up = _matrix(down), _matrix(up)
        in_f, out_f = name.shape
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_f or up.shape[0] != out_f \
                or down.shape[0] != up.shape[1]:
            raise CheckpointError(f"{path}: '{stem}' has down {down.shape} / up {up.shape}, the model's module is "
                                  f"{in_f} -> {out_f} -- a LoRA for another model size or architecture")
        rank = down.shape[0]
        if fmt == "kohya":
            alpha_key = f"{stem}.alpha"
            alpha = _scalar(arrays[alpha_key]) if alpha_key in arrays else float(rank)  # kohya: no alpha = scale 1
        elif fmt == "diffusers":
            alpha = alphas.get(name.component, {}).get("alpha", float(rank))
        elif fmt == "gm":
            alpha = alphas["gm"]["alpha"]
        else:
            alpha = float(rank)
        modules[name.ours] = (down, up, float(alpha))
    if not modules:
        raise CheckpointError(f"{path}: no LoRA factors in the file")
    return LoRAUpdates(modules, fmt, dict(metadata))


def _kohya_diffusers_path(name: LoRAName) -> str:
    return KOHYA_PREFIXES[name.component] + name.diffusers[len(name.component) + 1:].replace(".", "_")


def _matrix(array: np.ndarray) -> np.ndarray:
    # kohya's trainer stores linear LoRAs as (out, in); some tools as (out, in, 1, 1)
    return array.reshape(array.shape[:2]) if array.ndim == 4 and array.shape[2:] == (1, 1) else array


def _why_no_module(stem: str) -> str:
    if "mlp" in stem or "fc1" in stem or "fc2" in stem:
        return "LoRA on text-encoder MLPs is not supported here (self-attention only)"
    if any(part in stem for part in ("resnets", "in_layers", "out_layers", "conv", "emb_layers", "time_emb")):
        return "LoRA on convolution / ResNet layers (LoCon, LyCORIS) is not supported here"
    return "a LoRA for another architecture or model size?"


def _alphas(path, metadata: Mapping[str, str], fmt: str) -> Dict[str, Dict[str, float]]:
    """Per-component alphas recorded in a file's metadata (diffusers adapter metadata, our config)."""
    if fmt == "gm":
        from gm.checkpoint.lora import lora_config_from_metadata

        return {"gm": {"alpha": lora_config_from_metadata(path, metadata).alpha}}
    if fmt != "diffusers" or DIFFUSERS_ADAPTER_METADATA not in metadata:
        return {}
    try:
        adapter = json.loads(metadata[DIFFUSERS_ADAPTER_METADATA])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata '{DIFFUSERS_ADAPTER_METADATA}' is not JSON") from None
    out: Dict[str, Dict[str, float]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if f"{component}.lora_alpha" in adapter:
            out[component] = {"alpha": float(adapter[f"{component}.lora_alpha"])}
        if adapter.get(f"{component}.alpha_pattern") or adapter.get(f"{component}.rank_pattern"):
            raise CheckpointError(f"{path}: per-module rank/alpha patterns ({component}) are not supported")
    return out


# ----------------------------------------------------------------------------------------------
# updates -> a config and arrays our model loads


def config_and_arrays(path, updates: LoRAUpdates, names: Sequence[LoRAName], dropout: float = 0.0,
                      into: Optional[LoRAConfig] = None) -> Tuple[LoRAConfig, Dict[str, np.ndarray], Dict[str, int]]:
    """The LoRAConfig and our parameter arrays that compute what ``updates`` compute.

    Our model uses one rank and one alpha per LoRA: modules with another alpha get their scale
    folded into ``up``; modules of an adapted group the file lacks get zero factors (no effect);
    modules on text-encoder blocks SDXL never runs are dropped (they cannot change an output).
    ``into``: the config of a LoRA already injected in the model, which the file must fit.
    Returns (config, arrays, counts) with counts of ``applied``, ``zero_filled`` and ``no_effect`` modules.
    """
    by_ours = {n.ours: n for n in names}
    ranks = sorted({down.shape[0] for down, _, _ in updates.modules.values()})
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: modules have different ranks {ranks}; this model needs one rank per LoRA "
                              "(convert with a single rank)")
    rank = ranks[0]
    applied = {k: v for k, v in updates.modules.items() if by_ours[k].runs}
    no_effect = len(updates.modules) - len(applied)
    if not applied:
        raise CheckpointError(f"{path}: every module of this LoRA sits on a text-encoder block SDXL never runs")
    if into is not None:
        if into.rank != rank:
            raise CheckpointError(f"{path}: LoRA rank {rank} does not match the model's LoRA rank {into.rank}")
        groups, text_encoder, alpha = into.unet_targets, into.text_encoder, into.alpha
        outside = [k for k in applied if by_ours[k].group not in groups
                   and not (by_ours[k].group == TEXT_ENCODER_GROUP and text_encoder)]
        if outside:
            raise CheckpointError(f"{path}: module '{outside[0]}' is not adapted by the model's LoRA "
                                  f"(targets {', '.join(groups) or '-'}{', text encoders' if text_encoder else ''})")
    elif updates.format == "gm":
        from gm.checkpoint.lora import lora_config_from_metadata

        recorded = lora_config_from_metadata(path, updates.metadata or {})
        groups, text_encoder, alpha = recorded.unet_targets, recorded.text_encoder, recorded.alpha
    else:
        used = {by_ours[k].group for k in applied}
        groups = tuple(g for g in UNET_TARGET_GROUPS if g in used)
        text_encoder = TEXT_ENCODER_GROUP in used
        alpha = _most_common([a for _, _, a in applied.values()])
    config = into or LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, unet_targets=groups,
                                text_encoder=text_encoder)
    arrays: Dict[str, np.ndarray] = {}
    zero_filled = 0
    for name in names:
        if not name.runs or (name.group not in groups and not (name.group == TEXT_ENCODER_GROUP and text_encoder)):
            continue
        if name.ours in applied:
            down, up, module_alpha = applied[name.ours]
            if module_alpha != alpha:
                up = up * np.float32(module_alpha / alpha)
        else:
            in_f, out_f = name.shape
            down, up = np.zeros((rank, in_f), np.float32), np.zeros((out_f, rank), np.float32)
            zero_filled += 1
        arrays[f"{name.ours}.{LORA_DOWN}.weight"] = down
        arrays[f"{name.ours}.{LORA_UP}.weight"] = up
    return config, arrays, {"applied": len(applied), "zero_filled": zero_filled, "no_effect": no_effect}


def _most_common(values: List[float]) -> float:
    unique, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    return float(unique[int(np.argmax(counts))])


# ----------------------------------------------------------------------------------------------
# writing


def format_arrays(updates: LoRAUpdates, names: Sequence[LoRAName], fmt: str, config: Optional[LoRAConfig] = None,
                  extra_metadata: Optional[Mapping[str, object]] = None,
                  ) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """``updates`` as the tensors and string metadata of a ``fmt`` file (float32; cast on save).

    ``config``: the LoRAConfig they were trained with (recorded for lossless reading back here).
    ``extra_metadata``: training facts (base model, steps, resolution, prompts) for the header.
    """
    by_ours = {n.ours: n for n in names}
    missing = [k for k in updates.modules if k not in by_ours]
    if missing:
        raise CheckpointError(f"no {fmt} name for LoRA module '{missing[0]}'")
    extra = {str(k): str(v) for k, v in (extra_metadata or {}).items()}
    arrays: Dict[str, np.ndarray] = {}
    metadata: Dict[str, str] = {}
    if config is not None:
        from gm.checkpoint.lora import FORMAT_VERSION, VERSION_KEY

        metadata.update({VERSION_KEY: FORMAT_VERSION, **config.to_metadata()})
    if fmt == "gm":
        for ours, (down, up, _) in updates.modules.items():
            arrays[f"{ours}.{LORA_DOWN}.weight"], arrays[f"{ours}.{LORA_UP}.weight"] = down, up
        metadata.update(extra)
        return arrays, metadata
    if fmt == "kohya":
        for ours, (down, up, alpha) in updates.modules.items():
            stem = by_ours[ours].kohya
            arrays[f"{stem}.{LORA_DOWN}.weight"], arrays[f"{stem}.{LORA_UP}.weight"] = down, up
            arrays[f"{stem}.alpha"] = np.asarray(alpha, dtype=np.float32)
        metadata.update(_kohya_metadata(updates, extra))
        return arrays, metadata
    if fmt == "diffusers":
        per_component: Dict[str, List[Tuple[str, int, float]]] = {}
        for ours, (down, up, alpha) in updates.modules.items():
            name = by_ours[ours]
            arrays[f"{name.diffusers}.lora_A.weight"], arrays[f"{name.diffusers}.lora_B.weight"] = down, up
            module = name.diffusers[len(name.component) + 1:]
            # PEFT matches target_modules by suffix; without ``text_model.`` they also match
            # transformers >= 5's CLIPTextModel, which drops that level (diffusers strips it from keys)
            per_component.setdefault(name.component, []).append(
                (module.removeprefix("text_model."), down.shape[0], alpha))
        adapter = {}
        for component, entries in per_component.items():
            ranks = {r for _, r, _ in entries}
            alphas = {a for _, _, a in entries}
            if len(ranks) != 1 or len(alphas) != 1:
                raise CheckpointError(f"diffusers export: {component} modules have several ranks/alphas")
            adapter.update({f"{component}.r": ranks.pop(), f"{component}.lora_alpha": alphas.pop(),
                            f"{component}.target_modules": sorted(m for m, _, _ in entries),
                            f"{component}.init_lora_weights": True, f"{component}.lora_dropout": 0.0,
                            f"{component}.use_dora": False, f"{component}.bias": "none"})
        metadata[DIFFUSERS_ADAPTER_METADATA] = json.dumps(adapter, indent=2, sort_keys=True)
        metadata.update(extra)
        return arrays, metadata
    if fmt == "seed":
        for ours, (down, up, alpha) in updates.modules.items():
            if by_ours[ours].component != "unet":
                raise CheckpointError(f"the seed's LoRA layout holds UNet modules only; '{ours}' is a text-encoder "
                                      "module (export to kohya or diffusers instead)")
            scale = alpha / down.shape[0]
            arrays[f"{ours}.{SEED_DOWN}.weight"] = down
            arrays[f"{ours}.{SEED_UP}.weight"] = up if scale == 1.0 else up * np.float32(scale)
        return arrays, {}
    raise CheckpointError(f"unknown LoRA format '{fmt}'; expected one of {', '.join(FORMATS)}")


def _kohya_metadata(updates: LoRAUpdates, extra: Mapping[str, str]) -> Dict[str, str]:
    ranks = sorted({down.shape[0] for down, _, _ in updates.modules.values()})
    alphas = sorted({alpha for _, _, alpha in updates.modules.values()})
    resolution = extra.get("resolution", "1024")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic",
        "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else "dynamic",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_resolution": f"({resolution}, {resolution})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": KOHYA_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.title": extra.get("title", "sdxl dreambooth lora"),
    }
    mapping = {"base_model": "ss_sd_model_name", "step": "ss_steps", "instance_prompt": "modelspec.trigger_phrase",
               "class_prompt": "ss_class_prompt", "max_train_steps": "ss_max_train_steps"}
    for key, value in extra.items():
        metadata[mapping.get(key, key)] = value
    if "instance_prompt" in extra:
        metadata["ss_instance_prompt"] = extra["instance_prompt"]
    # kohya's own flag for a v-prediction base, beside ModelSpec's entry
    metadata["ss_v_parameterization"] = str(metadata["modelspec.prediction_type"] == "v")
    return metadata


# ----------------------------------------------------------------------------------------------
# file -> file


def convert_lora_file(engine: nn.Cell, source: str | Path, target: str | Path, fmt: str,
                      dtype: str = "keep") -> Dict[str, object]:
    """Read a LoRA file in any format and write it as ``fmt`` (``engine`` gives the names; it may
    be built without memory). Per-module alphas survive into kohya and diffusers files; our
    format records one rank/alpha (other alphas folded into ``up``). Returns a report."""
    from gm.checkpoint.lora import lora_config_from_metadata, read_any_lora_file, write_lora_arrays

    source, target = Path(source), Path(target)
    if target.exists() and target.resolve() == source.resolve():
        raise CheckpointError(f"{target} is the input file; choose another output name")
    if fmt not in FORMATS:
        raise CheckpointError(f"--to {fmt!r}: choose one of {', '.join(FORMATS)}")
    arrays, metadata, found = read_any_lora_file(source)
    names = lora_names(engine)
    updates = parse_updates(source, arrays, metadata, names, found)
    recorded = lora_config_from_metadata(source, metadata) if found == "gm" else None
    config, ours, _ = config_and_arrays(source, updates, names, into=recorded)
    # keep the source's own descriptive metadata (prompts, steps, base model) where it is plain text
    carried = {k: v for k, v in metadata.items() if k not in ("format", DIFFUSERS_ADAPTER_METADATA)
               and not k.startswith(("lora_", "gm_lora_"))}
    if fmt == "gm":
        out_arrays, header = format_arrays(LoRAUpdates(_pairs(ours, config.alpha)), names, "gm", config, carried)
    else:
        out_arrays, header = format_arrays(updates, names, fmt, config, carried)
    count = write_lora_arrays(target, out_arrays, header, fmt, dtype)
    return {"from": found, "to": fmt, "modules": len(updates), "tensors": count}


def _pairs(arrays: Mapping[str, np.ndarray], alpha: float) -> Dict[str, Tuple[np.ndarray, np.ndarray, float]]:
    down_suffix, up_suffix = f".{LORA_DOWN}.weight", f".{LORA_UP}.weight"
    return {key[: -len(down_suffix)]: (value, arrays[key[: -len(down_suffix)] + up_suffix], alpha)
            for key, value in arrays.items() if key.endswith(down_suffix)}
