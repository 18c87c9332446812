"""GeneralConditioner: the batch dict -> SDXL's ``crossattn`` and ``vector`` conditioning.

Two halves, so the text encoders can run inside a compiled graph:
- host: ``prepare_inputs(batch)`` turns each embedder's batch entry into one array
  (prompts -> int32 token ids, sizes -> float32), in embedder order;
- graph: ``construct(*inputs) -> (crossattn, vector)`` embeds and concatenates on the last axis,
  in embedder order (SDXL: crossattn = [CLIP-L 768, OpenCLIP-G 1280] = 2048 wide,
  vector = [OpenCLIP-G pooled 1280, original size 512, crop 512, target size 512] = 2816 wide).
``encode(batch)`` runs both and returns ``{"crossattn": ..., "vector": ...}``;
``get_unconditional_conditioning`` adds the classifier-free-guidance branch.

Parameters are ``embedders.N.*`` (official single file: ``conditioner.embedders.N.*``).
Source: ``sgm/modules/encoders/modules.py`` (GeneralConditioner) of Stability-AI/generative-models.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn, ops

from gm.modules.embedders.modules import AbstractEmbedder
from gm.util import instantiate_from_config

OUTPUT_KEYS = ("crossattn", "vector")
_ENTRY_KEYS = {"target", "params", "is_trainable", "input_key"}


def _build_embedder(index: int, entry: Mapping) -> AbstractEmbedder:
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ValueError(f"emb_models[{index}] has unsupported keys {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)} "
                         "(conditioning dropout 'ucg_rate' is not implemented)")
    if "input_key" not in entry:
        raise ValueError(f"emb_models[{index}] ({entry.get('target')}) needs an 'input_key' such as 'txt'")
    embedder = instantiate_from_config({"target": entry["target"], "params": entry.get("params") or {}})
    if not isinstance(embedder, AbstractEmbedder):
        raise ValueError(f"emb_models[{index}]: {entry['target']} is not an embedder (AbstractEmbedder)")
    embedder.input_key = str(entry["input_key"])
    embedder.is_trainable = bool(entry.get("is_trainable", False))
    if not embedder.is_trainable:
        for param in embedder.get_parameters():
            param.requires_grad = False
    return embedder


class GeneralConditioner(nn.Cell):
    """Runs every embedder on its batch entry and concatenates the outputs per conditioning slot.

    Args:
        emb_models: list of ``{target, params, input_key, is_trainable}`` (sgm's YAML layout).
    """

    def __init__(self, emb_models: Sequence[Mapping]):
        super().__init__()
        if not emb_models:
            raise ValueError("GeneralConditioner needs at least one entry in emb_models")
        self.embedders = nn.CellList([_build_embedder(i, e) for i, e in enumerate(emb_models)])
        self.input_keys = tuple(e.input_key for e in self.embedders)
        self.output_kinds = tuple(tuple(e.output_keys) for e in self.embedders)
        self.frozen = tuple(not e.is_trainable for e in self.embedders)
        produced = {k for kinds in self.output_kinds for k in kinds}
        if produced != set(OUTPUT_KEYS):
            raise ValueError(f"the embedders produce {sorted(produced)}; SDXL needs exactly {list(OUTPUT_KEYS)}")

    # -- host half -------------------------------------------------------------------------------

    def prepare_arrays(self, batch: Mapping) -> List[np.ndarray]:
        """One host array per embedder (token ids or numbers), all with the same batch size B.

        ``batch``: ``txt`` (list of B prompts), ``original_size_as_tuple``, ``crop_coords_top_left``,
        ``target_size_as_tuple`` ((B, 2) or (2,) numbers, (h, w) / (top, left) order as sgm).
        A single (2,) size is repeated for all B samples.
        """
        missing = [k for k in dict.fromkeys(self.input_keys) if k not in batch]
        if missing:
            raise ValueError(f"conditioning batch lacks keys {missing}; it has {sorted(batch)}")
        arrays = [emb.prepare(batch[emb.input_key]) for emb in self.embedders]
        sizes = {a.shape[0] for a in arrays} - {1}
        if len(sizes) > 1:
            rows = ", ".join(f"{k} {a.shape[0]}" for k, a in zip(self.input_keys, arrays))
            raise ValueError(f"conditioning batch entries differ in size ({rows}); give B rows each, or one size row")
        size = sizes.pop() if sizes else 1
        return [np.repeat(a, size, axis=0) if a.shape[0] != size else a for a in arrays]

    def prepare_inputs(self, batch: Mapping) -> Tuple[Tensor, ...]:
        """``prepare_arrays`` as Tensors, the positional inputs of ``construct``."""
        return tuple(Tensor(a) for a in self.prepare_arrays(batch))

    def encode(self, batch: Mapping) -> Dict[str, Tensor]:
        """Batch dict -> ``{"crossattn": (B, 77, C), "vector": (B, V)}``."""
        return dict(zip(OUTPUT_KEYS, self(*self.prepare_inputs(batch))))

    def output_shapes(self, batch: Mapping) -> Dict[str, Tuple[int, ...]]:
        """The shapes ``encode(batch)`` returns (float32), without running an embedder or a
        tokenizer: the text slots give one row per token, every slot its ``output_widths``."""
        shapes = [emb.prepared_shape(batch[emb.input_key]) for emb in self.embedders]
        rows = max(shape[0] for shape in shapes)  # a single size row is repeated
        widths: Dict[str, int] = {key: 0 for key in OUTPUT_KEYS}
        tokens = None
        for emb, shape in zip(self.embedders, shapes):
            for key, width in zip(emb.output_keys, emb.output_widths(np.empty(shape, np.float32))):
                widths[key] += width
                if key == "crossattn":
                    tokens = shape[1]
        return {"crossattn": (rows, tokens, widths["crossattn"]), "vector": (rows, widths["vector"])}

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping,
        batch_uc: Optional[Mapping] = None,
        force_uc_zero_embeddings: Sequence[str] = ("txt",),
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Conditioning for a batch and for its classifier-free-guidance counterpart.

        Args:
            batch_c: the conditional batch.
            batch_uc: the unconditional batch (e.g. the negative prompt in ``txt``); defaults to batch_c.
            force_uc_zero_embeddings: input keys whose embedder outputs are zeroed in the unconditional
                branch. ``("txt",)`` zeroes the text part of crossattn and the pooled part of vector,
                which is what SDXL does for an empty negative prompt (sgm's sampling scripts; diffusers'
                ``force_zeros_for_empty_prompt`` when ``negative_prompt`` is None). Pass ``()`` to
                encode a real negative prompt instead.
        Returns:
            ``(cond, uncond)``, each ``{"crossattn", "vector"}``.
        """
        cond = self.encode(batch_c)
        arrays = self.prepare_arrays(batch_uc if batch_uc is not None else batch_c)
        zero = set(force_uc_zero_embeddings)
        unknown = zero - set(self.input_keys)
        if unknown:
            raise ValueError(f"force_uc_zero_embeddings names {sorted(unknown)}; input keys are {self.input_keys}")
        outputs = self(*(Tensor(a) for a in arrays))
        keep = self.keep_masks(arrays, zero)
        uncond = {key: out * Tensor(keep[key]) for key, out in zip(OUTPUT_KEYS, outputs)}
        return cond, uncond

    def keep_masks(self, arrays: Sequence[np.ndarray], zero: set) -> Dict[str, np.ndarray]:
        """Per output slot, a float32 row of 1 (keep) / 0 (zero) over its concatenated columns."""
        cols: Dict[str, List[np.ndarray]] = {k: [] for k in OUTPUT_KEYS}
        for emb, array in zip(self.embedders, arrays):
            for key, width in zip(emb.output_keys, emb.output_widths(array)):
                cols[key].append(np.full((width,), 0.0 if emb.input_key in zero else 1.0, np.float32))
        return {k: np.concatenate(v) for k, v in cols.items()}

    # -- graph half ------------------------------------------------------------------------------

    def construct(self, *inputs):
        """One tensor per embedder (ids (B, 77) int32 or numbers (B, n) float32) -> (crossattn, vector).

        crossattn: (B, 77, sum of text widths); vector: (B, sum of vector widths); float32.
        """
        crossattn = []
        vector = []
        for i in range(len(self.output_kinds)):
            outputs = self.embedders[i](inputs[i])
            if len(self.output_kinds[i]) == 1:
                outputs = (outputs,)
            for j in range(len(self.output_kinds[i])):
                out = outputs[j]
                if self.frozen[i]:
                    out = ops.stop_gradient(out)
                if self.output_kinds[i][j] == "crossattn":
                    crossattn.append(out)
                else:
                    vector.append(out)
        return ops.cat(crossattn, axis=-1), ops.cat(vector, axis=-1)
