"""Low-rank adaptation (LoRA, Hu et al. 2021, arXiv 2106.09685) for the SDXL engine.

A LoRA layer adds ``scale * up(down(dropout(x)))`` to a frozen projection, with ``down`` (rank, in)
drawn like torch's/PEFT's kaiming-uniform and ``up`` (out, rank) zero, so a freshly injected
model computes exactly what the base model computes; ``scale = alpha / rank``.

Names. An injected layer *keeps* the base layer's Parameter objects under their names, so the
official keys stay valid (base weights still load by name into a LoRA model, a merged model saves
as an official single file), and adds its LoRA parameters beside them:

    model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight            (base)
    model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight  (rank, in)
    model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up.weight    (out, rank)

OpenCLIP-G packs q, k, v into one ``attn.in_proj_weight`` (3W, W); its LoRA gets one low-rank
delta per slice, ``attn.in_proj_{q,k,v}.lora_{down,up}.weight``, which a kohya export maps to
``lora_te2_text_model_encoder_layers_N_self_attn_{q,k,v}_proj``. ``lora_modules`` lists every
LoRA with the official base weight (and row slice) it adds to, for exporters.

Graph mode (and ``ms.jit``): a compiled cell keeps the graph of the structure it was compiled
with, even after a child is replaced (measured on MindSpore 2.10). ``inject_lora``, ``merge_lora``,
``unmerge_lora`` and ``unfreeze_text_encoders`` therefore drop every compiled graph
(``mindspore.ms_memory_recycle``); the next call of any cell compiles afresh.

Sources: the LoRA paper; PEFT ``tuners/lora/layer.py`` (initialisation, scale); kohya-ss
``networks/lora.py`` (lora_down/lora_up naming, alpha).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from gm.errors import ConfigError
from gm.modules.attention import dropout_cell, merge_heads, scaled_dot_product_attention, split_heads
from gm.modules.embedders.clip import PackedSelfAttention
from gm.modules.embedders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from gm.modules.layers import Linear, linear

_logger = logging.getLogger(__name__)

LORA_DOWN, LORA_UP = "lora_down", "lora_up"
UNET_PREFIX = "model.diffusion_model."
_BLOCK = "*.transformer_blocks.*."
# UNet target groups (module paths under model.diffusion_model, fnmatch patterns)
UNET_TARGET_GROUPS: Dict[str, Tuple[str, ...]] = {
    "attn": tuple(f"{_BLOCK}{attn}.{proj}" for attn in ("attn1", "attn2")
                  for proj in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff": (f"{_BLOCK}ff.net.0.proj", f"{_BLOCK}ff.net.2"),
    "proj": ("*.proj_in", "*.proj_out"),
}
PACKED_SLICES = ("q", "k", "v")
_CONFIG_ATTR, _MERGED_ATTR = "_lora_config", "_lora_merged"


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name (any prefix) is a LoRA factor: ``...lora_down.weight``/``...lora_up.weight``."""
    return name.endswith((f"{LORA_DOWN}.weight", f"{LORA_UP}.weight"))


@dataclass(frozen=True)
class LoRAConfig:
    """What to inject and how strongly.

    Args:
        rank: inner width r of the low-rank update (``--lora_rank``), >= 1.
        alpha: ``scale = alpha / rank`` (``--lora_alpha``); None means alpha = rank (scale 1).
        dropout: dropout on the LoRA input while training (``--lora_dropout``), in [0, 1).
        unet_targets: groups of UNet layers (``--lora_unet_targets``): ``attn`` (to_q/k/v/out.0 of
            attn1 and attn2 in every transformer block), ``ff`` (ff.net.0.proj, ff.net.2),
            ``proj`` (proj_in, proj_out of every spatial transformer).
        text_encoder: also adapt both text encoders' self-attention (``--train_text_encoder``).
    """

    rank: int = 4
    alpha: Optional[float] = None
    dropout: float = 0.0
    unet_targets: Tuple[str, ...] = ("attn",)
    text_encoder: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ConfigError(f"--lora_rank must be an integer >= 1, got {self.rank!r}")
        alpha = float(self.rank) if self.alpha is None else self.alpha
        if not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"--lora_alpha must be a number > 0 (scale = alpha / rank), got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.unet_targets,) if isinstance(self.unet_targets, str) else tuple(self.unet_targets)
        unknown = [t for t in targets if t not in UNET_TARGET_GROUPS]
        if unknown:
            raise ConfigError(f"--lora_unet_targets: unknown group(s) {unknown}; choose from "
                              f"{', '.join(UNET_TARGET_GROUPS)}")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"--lora_unet_targets lists a group twice: {list(targets)}")
        if not targets and not self.text_encoder:
            raise ConfigError("--lora_unet_targets is empty and --train_text_encoder is off: nothing to train")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "unet_targets", tuple(t for t in UNET_TARGET_GROUPS if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def same_weights_layout(self, other: LoRAConfig) -> bool:
        """Whether LoRA weights of ``other`` fit and mean the same here (dropout aside)."""
        return (self.rank, self.alpha, self.unet_targets, self.text_encoder) == (
            other.rank, other.alpha, other.unet_targets, other.text_encoder)

    def to_metadata(self) -> Dict[str, str]:
        """String metadata (safetensors header / ckpt) that ``from_metadata`` reads back."""
        return {"lora_rank": str(self.rank), "lora_alpha": repr(self.alpha), "lora_dropout": repr(self.dropout),
                "lora_unet_targets": ",".join(self.unet_targets), "lora_text_encoder": str(self.text_encoder).lower()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> LoRAConfig:
        """Inverse of ``to_metadata``; KeyError/ValueError/ConfigError on missing or bad entries."""
        flag = metadata["lora_text_encoder"]
        if flag not in ("true", "false"):
            raise ValueError(f"lora_text_encoder is '{flag}', expected true or false")
        targets = tuple(t for t in metadata["lora_unet_targets"].split(",") if t)
        return cls(rank=int(metadata["lora_rank"]), alpha=float(metadata["lora_alpha"]),
                   dropout=float(metadata.get("lora_dropout", "0.0")), unet_targets=targets,
                   text_encoder=flag == "true")


# ----------------------------------------------------------------------------------------------
# layers


class LoRABranch(nn.Cell):
    """The low-rank update alone: ``x (..., in) -> scale * up(down(dropout(x))) (..., out)``.

    ``lora_down.weight`` (rank, in): kaiming-uniform(a=sqrt(5)) as torch.nn.Linear/PEFT;
    ``lora_up.weight`` (out, rank): zeros, so the update starts at exactly 0.
    ``dtype``: of the LoRA factors; inputs of another dtype are cast in and the update cast back.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 dtype=ms.float32, input_dtype=None):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_features = (in_features, out_features)
        self.lora_down = Linear(in_features, rank, bias=False, dtype=dtype)
        self.lora_up = Linear(rank, out_features, bias=False, dtype=dtype)
        self.lora_up.weight.set_data(initializer("zeros", (out_features, rank), dtype))
        self.lora_dropout = dropout_cell(dropout)
        # static flags: no cast and no scaling op in the graph when they are not needed
        self.lora_cast = input_dtype is not None and input_dtype != dtype
        self.lora_dtype = dtype
        self.lora_scaled = self.scale != 1.0

    def lora_delta(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) in x's dtype."""
        h = self.lora_dropout(x)
        if self.lora_cast:
            h = h.astype(self.lora_dtype)
        h = self.lora_up(self.lora_down(h))
        if self.lora_scaled:
            h = h * self.scale
        if self.lora_cast:
            h = h.astype(x.dtype)
        return h

    def construct(self, x: Tensor) -> Tensor:
        return self.lora_delta(x)

    def delta_weight(self) -> np.ndarray:
        """``scale * up @ down`` (out, in) as float32 numpy, the update merged into the base weight."""
        up = self.lora_up.weight.asnumpy().astype(np.float32)
        down = self.lora_down.weight.asnumpy().astype(np.float32)
        return np.float32(self.scale) * (up @ down)


class LoRALinear(LoRABranch):
    """A ``Linear`` plus a LoRA branch: ``y = x @ W.T + b + scale * up(down(dropout(x)))``.

    Holds the *same* ``weight``/``bias`` Parameter objects as ``base`` (names unchanged).
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0, dtype=None):
        dtype = base.weight.dtype if dtype is None else dtype
        super().__init__(base.in_features, base.out_features, rank, alpha, dropout, dtype, base.weight.dtype)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias

    def construct(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        # not as x (W + s U D)^T, one product fewer (tried, 12th session: ~3% off the tiny step):
        # its graph costs MindSpore's front end ~0.25 MB more compile memory per layer (-34 MB for
        # the tiny train step's 136 layers this way, where memory is the tighter bound)
        return linear(x, self.weight, self.bias) + self.lora_delta(x)


class LoRAPackedSelfAttention(nn.Cell):
    """``PackedSelfAttention`` (OpenCLIP's packed q/k/v) with a LoRA update per q, k and v slice.

    Keeps ``in_proj_weight``/``in_proj_bias``/``out_proj`` of ``base``; adds ``in_proj_q``,
    ``in_proj_k``, ``in_proj_v`` (each a LoRABranch W -> W) whose outputs are added to the
    corresponding third of the packed projection's output.
    """

    def __init__(self, base: PackedSelfAttention, rank: int, alpha: float, dropout: float = 0.0, dtype=None):
        super().__init__()
        self.heads, self.width = base.heads, base.width
        self.in_proj_weight = base.in_proj_weight
        self.in_proj_bias = base.in_proj_bias
        self.out_proj = base.out_proj
        base_dtype = base.in_proj_weight.dtype
        dtype = base_dtype if dtype is None else dtype
        self.in_proj_q = LoRABranch(self.width, self.width, rank, alpha, dropout, dtype, base_dtype)
        self.in_proj_k = LoRABranch(self.width, self.width, rank, alpha, dropout, dtype, base_dtype)
        self.in_proj_v = LoRABranch(self.width, self.width, rank, alpha, dropout, dtype, base_dtype)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L, W), additive mask (L, L) -> (B, L, W)."""
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        q, k, v = ops.split(qkv, self.width, axis=-1)
        q = split_heads(q + self.in_proj_q(x), self.heads)
        k = split_heads(k + self.in_proj_k(x), self.heads)
        v = split_heads(v + self.in_proj_v(x), self.heads)
        return self.out_proj(merge_heads(scaled_dot_product_attention(q, k, v, mask)))

    def branches(self) -> Tuple[LoRABranch, LoRABranch, LoRABranch]:
        return self.in_proj_q, self.in_proj_k, self.in_proj_v


# ----------------------------------------------------------------------------------------------
# which modules: planning from the model's own structure


@dataclass(frozen=True)
class LoRATarget:
    """One module to adapt.

    Attributes:
        path: module path relative to the root (``...attn1.to_q``, or ``...resblocks.N.attn`` for
            a packed attention).
        kind: ``linear`` or ``packed``.
        component: ``unet``, ``text_encoder`` (CLIP-L) or ``text_encoder_2`` (OpenCLIP-G).
        in_features, out_features: of the (per-slice) projection.
    """

    path: str
    kind: str
    component: str
    in_features: int
    out_features: int

    def parameter_shapes(self, rank: int) -> Dict[str, Tuple[int, ...]]:
        """LoRA parameter name (relative to the root) -> shape."""
        prefixes = [self.path] if self.kind == "linear" else [f"{self.path}.in_proj_{s}" for s in PACKED_SLICES]
        shapes = {}
        for prefix in prefixes:
            shapes[f"{prefix}.{LORA_DOWN}.weight"] = (rank, self.in_features)
            shapes[f"{prefix}.{LORA_UP}.weight"] = (self.out_features, rank)
        return shapes


def plan_lora(root: nn.Cell, config: LoRAConfig, *, injected_ok: bool = False,
              every_layer: bool = False) -> List[LoRATarget]:
    """The modules ``inject_lora(root, config)`` adapts, found by name pattern over ``root``.

    ``root`` is a DiffusionEngine (``model.diffusion_model``, ``conditioner.embedders``). Text
    encoder targets cover only the blocks the embedder runs: SDXL takes CLIP-L's penultimate
    hidden state, so its last block never runs and a LoRA there would never train.
    ``injected_ok``: also list modules that already carry a LoRA (for naming tables);
    ``every_layer``: include text-encoder blocks that never run (other trainers adapt them).
    """
    cells = dict(root.cells_and_names())
    patterns = [(UNET_PREFIX + p, "linear", "unet") for g in config.unet_targets for p in UNET_TARGET_GROUPS[g]]
    if config.text_encoder:
        patterns += _text_encoder_patterns(root, every_layer)
    targets = []
    for path, cell in cells.items():
        match = next(((kind, comp) for pattern, kind, comp in patterns if fnmatch.fnmatchcase(path, pattern)), None)
        if match is None:
            continue
        kind, component = match
        if isinstance(cell, (LoRABranch, LoRAPackedSelfAttention)) and not injected_ok:
            raise ConfigError(f"{path} already has a LoRA; inject once per model")
        if kind == "linear" and type(cell) not in (Linear, LoRALinear):
            raise ConfigError(f"LoRA target {path} is a {type(cell).__name__}, not a Linear layer "
                              "(only linear projections can take LoRA; check use_linear_in_transformer)")
        if kind == "packed" and type(cell) not in (PackedSelfAttention, LoRAPackedSelfAttention):
            raise ConfigError(f"LoRA target {path} is a {type(cell).__name__}, not a PackedSelfAttention")
        in_f, out_f = (cell.in_features, cell.out_features) if kind == "linear" else (cell.width, cell.width)
        targets.append(LoRATarget(path, kind, component, in_f, out_f))
    if not targets:
        raise ConfigError(f"no LoRA targets found for {config} -- is the root a DiffusionEngine?")
    return targets


def _text_encoder_patterns(root: nn.Cell, every_layer: bool = False) -> List[Tuple[str, str, str]]:
    embedders = getattr(getattr(root, "conditioner", None), "embedders", None)
    if embedders is None:
        raise ConfigError("--train_text_encoder needs a DiffusionEngine with conditioner.embedders")
    patterns = []
    for index, embedder in enumerate(embedders):
        prefix = f"conditioner.embedders.{index}."
        if isinstance(embedder, FrozenCLIPEmbedder):
            layers = f"{prefix}transformer.text_model.encoder.layers"
            total = len(embedder.transformer.text_model.encoder.layers)
            for i in range(total if every_layer else embedder.num_blocks):
                patterns += [(f"{layers}.{i}.self_attn.{p}", "linear", "text_encoder")
                             for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        elif isinstance(embedder, FrozenOpenCLIPEmbedder2):
            # the pooled output and layer="last" run every block, the penultimate alone all but one
            runs_all = embedder.return_pooled or embedder.layer == "last" or every_layer
            for i in range(embedder.num_layers if runs_all else embedder.num_layers - 1):
                block = f"{prefix}model.transformer.resblocks.{i}.attn"
                patterns += [(block, "packed", "text_encoder_2"), (f"{block}.out_proj", "linear", "text_encoder_2")]
    if not patterns:
        raise ConfigError("--train_text_encoder: the conditioner has no CLIP text embedder")
    return patterns


# ----------------------------------------------------------------------------------------------
# injection


def inject_lora(root: nn.Cell, config: LoRAConfig, dtype=None) -> List[LoRATarget]:
    """Replace every target module of ``root`` with its LoRA version (base Parameters shared).

    Load base weights before injecting (the base loaders expect the base parameter set). With
    ``config.text_encoder`` the adapted text embedders are also unfrozen (``unfreeze_text_encoders``).
    ``dtype``: LoRA factor dtype (default: the base weight's); e.g. float32 factors on an fp16 base.
    Returns the injected targets; drops compiled graphs (see the module docstring).
    """
    if lora_config_of(root) is not None:
        raise ConfigError("this model already has LoRA layers; build a fresh engine to inject another LoRA")
    targets = plan_lora(root, config)
    # a packed attention is replaced before its out_proj (sorted paths), so that out_proj is
    # then found, and replaced, inside the new attention cell
    for target in sorted(targets, key=lambda t: t.path):
        base = _get_cell(root, target.path)
        if target.kind == "linear":
            new = LoRALinear(base, config.rank, config.alpha, config.dropout, dtype)
        else:
            new = LoRAPackedSelfAttention(base, config.rank, config.alpha, config.dropout, dtype)
        object.__setattr__(new, "_lora_base", base)  # kept out of the cell tree, for merge_lora
        _set_cell(root, target.path, new, base)
    object.__setattr__(root, _CONFIG_ATTR, config)
    object.__setattr__(root, _MERGED_ATTR, None)
    _name_parameters(root)
    if config.text_encoder:
        unfreeze_text_encoders(root)
    _drop_compiled_graphs()
    _logger.info("LoRA rank %d alpha %g on %d modules (%d parameters)", config.rank, config.alpha, len(targets),
                 sum(int(np.prod(p.shape)) for p in lora_parameters(root).values()))
    return targets


def lora_config_of(root: nn.Cell) -> Optional[LoRAConfig]:
    """The LoRAConfig ``root`` was injected with, or None."""
    return root.__dict__.get(_CONFIG_ATTR)


def is_merged(root: nn.Cell) -> bool:
    return root.__dict__.get(_MERGED_ATTR) is not None


def unfreeze_text_encoders(root: nn.Cell) -> int:
    """Let gradients flow through every text embedder that holds LoRA parameters.

    The conditioner cuts gradients after frozen embedders (``ops.stop_gradient``, decided at
    compile time from ``conditioner.frozen``); this marks the adapted embedders trainable and
    updates that tuple. Base parameters keep ``requires_grad=False``. Returns the count.
    """
    conditioner = root.conditioner
    count = 0
    for embedder in conditioner.embedders:
        if any(is_lora_parameter(n) for n, _ in embedder.parameters_and_names()):
            embedder.is_trainable = True
            count += 1
    conditioner.frozen = tuple(not e.is_trainable for e in conditioner.embedders)
    _drop_compiled_graphs()
    return count


def _get_cell(root: nn.Cell, path: str) -> nn.Cell:
    cell = root
    for part in path.split("."):
        cell = cell[int(part)] if part.isdigit() and isinstance(cell, (nn.CellList, nn.SequentialCell)) \
            else getattr(cell, part)
    return cell


def _set_cell(root: nn.Cell, path: str, new: nn.Cell, old: nn.Cell) -> None:
    """Put ``new`` where ``old`` sits (attribute or CellList/SequentialCell item)."""
    parent_path, _, name = path.rpartition(".")
    parent = _get_cell(root, parent_path) if parent_path else root
    if name.isdigit() and isinstance(parent, (nn.CellList, nn.SequentialCell)):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)
    if getattr(old, "_has_config_recompute", False) and not getattr(new, "_has_config_recompute", False):
        new._recompute(False, True)  # the replaced cell sat inside a recomputed block: so does its successor


def _name_parameters(root: nn.Cell) -> None:
    # assigning a cell renames its Parameters with only the local attribute as prefix; give every
    # parameter its full path so names stay unique (graph compile and optimizers require it)
    for name, param in root.parameters_and_names():
        if param.name != name:
            param.name = name


def _drop_compiled_graphs() -> None:
    # also in PyNative mode, where ms.jit functions keep compiled graphs
    ms.ms_memory_recycle()


# ----------------------------------------------------------------------------------------------
# listing, training, merging


@dataclass(frozen=True)
class LoRAModule:
    """One injected LoRA update, described for exporters.

    Attributes:
        name: prefix of its parameters (``<name>.lora_down.weight``), relative to the root.
        weight: official name of the base weight it adds to (``...to_q.weight``, ``...attn.in_proj_weight``).
        rows: (start, stop) of the base weight's rows it adds to (packed q/k/v), None for all rows.
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        rank, alpha: of the update (scale = alpha / rank).
        cell: the LoRABranch holding ``lora_down``/``lora_up``.
    """

    name: str
    weight: str
    rows: Optional[Tuple[int, int]]
    component: str
    rank: int
    alpha: float
    cell: LoRABranch = field(repr=False, compare=False)


def lora_modules(root: nn.Cell) -> List[LoRAModule]:
    """Every LoRA update in ``root`` (unmerged), in module order."""
    modules = []
    for path, cell in root.cells_and_names():
        component = _component_of(path)
        if isinstance(cell, LoRALinear):
            modules.append(LoRAModule(path, f"{path}.weight", None, component, cell.rank, cell.alpha, cell))
        elif isinstance(cell, LoRAPackedSelfAttention):
            for i, (s, branch) in enumerate(zip(PACKED_SLICES, cell.branches())):
                rows = (i * cell.width, (i + 1) * cell.width)
                modules.append(LoRAModule(f"{path}.in_proj_{s}", f"{path}.in_proj_weight", rows, component,
                                          branch.rank, branch.alpha, branch))
    return modules


def _component_of(path: str) -> str:
    if path.startswith(UNET_PREFIX):
        return "unet"
    return "text_encoder_2" if ".resblocks." in path else "text_encoder"


def lora_parameters(root: nn.Cell) -> Dict[str, Parameter]:
    """LoRA parameter name (relative to ``root``) -> Parameter, in module order."""
    return {name: p for name, p in root.parameters_and_names() if is_lora_parameter(name)}


def mark_only_lora_trainable(root: nn.Cell) -> int:
    """``requires_grad`` True on LoRA parameters, False on every other parameter; returns the LoRA count."""
    count = 0
    for name, param in root.parameters_and_names():
        param.requires_grad = is_lora_parameter(name)
        count += param.requires_grad
    return count


def merge_lora(root: nn.Cell) -> int:
    """Fold every LoRA update into its base weight (``W += scale * up @ down``) and put the plain
    base layers back, so the model has the base structure and names (fast to serve; its
    ``parameters_and_names`` are an official checkpoint). ``unmerge_lora`` undoes it.

    Returns the number of merged updates; drops compiled graphs.
    """
    if lora_config_of(root) is None:
        raise ConfigError("merge_lora: this model has no LoRA layers")
    if is_merged(root):
        raise ConfigError("merge_lora: the LoRA is already merged")
    params = dict(root.parameters_and_names())
    modules = lora_modules(root)
    for module in modules:
        _add_to_weight(params[module.weight], module.rows, module.cell.delta_weight())
    swapped = []
    cells = dict(root.cells_and_names())
    # out_proj of a packed attention before the attention itself (reverse of injection order)
    for path in sorted((p for p, c in cells.items() if isinstance(c, (LoRALinear, LoRAPackedSelfAttention))),
                       reverse=True):
        lora_cell = _get_cell(root, path)
        base = _base_cell(lora_cell)
        _set_cell(root, path, base, lora_cell)
        swapped.append((path, lora_cell, base))
    object.__setattr__(root, _MERGED_ATTR, swapped)
    _name_parameters(root)
    _drop_compiled_graphs()
    return len(modules)


def unmerge_lora(root: nn.Cell) -> int:
    """Undo ``merge_lora``: subtract each update from its base weight and reinstall the LoRA layers.

    Base weights come back to within float rounding of their values before the merge (one add and
    one subtract of the same float32 delta). Returns the number of updates; drops compiled graphs.
    """
    swapped = root.__dict__.get(_MERGED_ATTR)
    if not swapped:
        raise ConfigError("unmerge_lora: the model has no merged LoRA")
    for path, lora_cell, base in reversed(swapped):
        _set_cell(root, path, lora_cell, base)
    object.__setattr__(root, _MERGED_ATTR, None)
    params = dict(root.parameters_and_names())
    modules = lora_modules(root)
    for module in modules:
        _add_to_weight(params[module.weight], module.rows, -module.cell.delta_weight())
    _name_parameters(root)
    _drop_compiled_graphs()
    return len(modules)


def _base_cell(lora_cell: nn.Cell) -> nn.Cell:
    """The plain layer ``lora_cell`` replaced (it shares the same base Parameters)."""
    return lora_cell.__dict__["_lora_base"]


def _add_to_weight(param: Parameter, rows: Optional[Tuple[int, int]], delta: np.ndarray) -> None:
    weight = param.asnumpy()
    updated = weight.astype(np.float32)
    if rows is None:
        updated += delta
    else:
        updated[rows[0]:rows[1]] += delta
    param.set_data(Tensor(updated.astype(weight.dtype)))


def set_lora_values(root: nn.Cell, arrays: Mapping[str, np.ndarray]) -> None:
    """Assign LoRA arrays by name (cast to each parameter's dtype); callers check keys and shapes."""
    params = lora_parameters(root)
    for name, value in arrays.items():
        params[name].set_data(Tensor(np.asarray(value), dtype=params[name].dtype))


def lora_state(root: nn.Cell) -> Dict[str, np.ndarray]:
    """LoRA parameter name -> numpy copy."""
    return {name: p.asnumpy() for name, p in lora_parameters(root).items()}


def expected_lora_shapes(targets: Sequence[LoRATarget], rank: int) -> Dict[str, Tuple[int, ...]]:
    """Parameter name -> shape that injecting ``targets`` at ``rank`` creates."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for target in targets:
        shapes.update(target.parameter_shapes(rank))
    return shapes
