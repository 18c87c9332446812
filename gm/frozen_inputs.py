"""The work no gradient flows through: VAE posterior moments and text conditioning of the training
samples, either computed for every micro-batch (:class:`FrozenInputs`) or once for every image
variant and prompt the run will use (:class:`CachedInputs`, ``--cache_latents``).

Both produce the train step's inputs the same way, so they give the same loss for the same draws:

* the VAE graph returns the posterior ``(mean, std)`` of each image; the latent is sampled on the
  host, ``(mean + std * noise) * scale_factor`` (as diffusers' ``latent_dist.sample()``; the
  posterior mean when the noise is None). The cache stores ``(mean, std)``, not a latent, so every
  step still draws its own posterior sample from the sample's stream position;
* the conditioner returns ``crossattn`` (a function of the prompt) and ``vector`` (of the prompt
  and the micro-conditioning sizes, which follow the crop). The cache keeps one ``crossattn`` per
  prompt and one ``vector`` per (prompt, sizes).

With the text encoders trained, the conditioning is computed inside the gradient and only the
latents can be cached (the token ids and sizes are then passed through).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from gm.data.dreambooth import SIZE_KEYS, model_inputs
from gm.fs import atomic_path

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run one-off work in PyNative mode, then restore the mode.

    Encoding a handful of batches once (the cache, the probe's inputs) costs less eagerly than
    compiling the VAE and text-encoder graphs for it, and leaves no compiled graph holding memory.
    Results are the same (tests/unit/test_frozen_inputs.py: eager cache == compiled per-step path,
    bit for bit).
    """
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=previous)


class EncodeMoments(nn.Cell):
    """Images (N, 3, R, R) in [-1, 1] -> the VAE posterior's ``(mean, std)``, each (N, 4, R/8, R/8)."""

    def __init__(self, engine: nn.Cell):
        super().__init__(auto_prefix=False)
        self.engine = engine

    def construct(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        mean, logvar = self.engine.first_stage_model.encode(images)
        return mean, ops.exp(0.5 * logvar)


def sample_latents(mean: np.ndarray, std: np.ndarray, noise: Optional[np.ndarray], scale_factor: float) -> np.ndarray:
    """Scaled latents from posterior moments and unit noise (the mean when ``noise`` is None), float32."""
    latents = mean if noise is None else mean + std * noise
    return (latents * np.float32(scale_factor)).astype(np.float32)


def latent_shape(pixels: np.ndarray) -> Tuple[int, int, int]:
    """(C, H/8, W/8) of the latents of ``pixels`` (N, 3, H, W)."""
    return 4, pixels.shape[2] // 8, pixels.shape[3] // 8


def _row_variants(batch: Mapping) -> List[Hashable]:
    kinds = ["instance"] + (["class"] if "class_pixels" in batch else [])
    return [v for kind in kinds for v in batch[f"{kind}_variants"]]


def _cond_keys(cond_batch: Mapping) -> List[Tuple]:
    """One hashable key per row of a conditioner batch: the prompt and the three sizes."""
    return [(prompt, *(tuple(float(x) for x in cond_batch[key][i]) for key in SIZE_KEYS))
            for i, prompt in enumerate(cond_batch["txt"])]


class FrozenInputs:
    """Per micro-batch: VAE moments and conditioning of the batch's rows, computed now.

    ``__call__(batch, posterior_noise) -> (latents, cond_inputs)``: ``batch`` a collated
    :class:`gm.data.dreambooth.DreamBoothDataset` batch, ``posterior_noise`` (N, 4, h, w) or None;
    latents a Tensor (N, 4, h, w); cond_inputs ``(crossattn, vector)`` Tensors, or with
    ``train_text_encoder`` the conditioner's inputs (token ids and sizes).
    """

    cached = False

    def __init__(self, engine: nn.Cell, train_text_encoder: bool = False):
        self.engine = engine
        self.train_text_encoder = train_text_encoder
        self._encode = EncodeMoments(engine)

    def moments(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        mean, std = self._encode(Tensor(pixels))
        return mean.asnumpy(), std.asnumpy()

    def encode_conditioning(self, cond_batch: Mapping) -> Tuple[np.ndarray, np.ndarray]:
        cond = self.engine.conditioner.encode(cond_batch)
        return cond["crossattn"].asnumpy(), cond["vector"].asnumpy()

    def batch_moments(self, batch: Mapping) -> Tuple[np.ndarray, np.ndarray]:
        return self.moments(model_inputs(batch)[0])

    def batch_conditioning(self, cond_batch: Mapping) -> Tuple[np.ndarray, np.ndarray]:
        return self.encode_conditioning(cond_batch)

    def __call__(self, batch: Mapping, posterior_noise: Optional[np.ndarray]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        _, cond_batch = model_inputs(batch)
        mean, std = self.batch_moments(batch)
        latents = Tensor(sample_latents(mean, std, posterior_noise, self.engine.scale_factor))
        if self.train_text_encoder:
            return latents, self.engine.conditioner.prepare_inputs(cond_batch)
        crossattn, vector = self.batch_conditioning(cond_batch)
        return latents, (Tensor(crossattn), Tensor(vector))


class CachedInputs(FrozenInputs):
    """:class:`FrozenInputs` computed once, before the loop, for every row the run will train on.

    Args:
        engine: the diffusion engine (its VAE and conditioner are used here only, and may be
            released afterwards with :func:`release_frozen_modules`).
        dataset: the ``DreamBoothDataset``.
        positions: every stream position this process will train on (and any the progress probe
            uses); each distinct image variant ``(path, crop, flip)`` and (prompt, sizes) row
            among them is computed once.
        chunk: rows per VAE/text-encoder call (the micro-batch's row count, as the per-step
            path batches them). The encoding runs eagerly (:func:`eager`): it is done once.
        train_text_encoder: cache the latents only.
    """

    cached = True

    def __init__(self, engine: nn.Cell, dataset, positions: Iterable[int], chunk: int,
                 train_text_encoder: bool = False, store: Optional[Path] = None,
                 identity: Optional[Mapping] = None):
        super().__init__(engine, train_text_encoder)
        pixels, cond_rows = self._rows(dataset, positions)
        path = None
        if store is not None:
            path = Path(store) / f"{_store_key(identity or {}, pixels, cond_rows, chunk, train_text_encoder)}.npz"
        if path is not None and self._load(path, pixels, cond_rows):
            _logger.info("VAE moments and text conditioning read from %s", path)
        else:
            with eager():
                self._fill(pixels, cond_rows, chunk)
            if path is not None:
                self._save(path)
        self._encode = None  # everything is cached: drop the VAE cell (and its hold on the weights)

    @staticmethod
    def _rows(dataset, positions: Iterable[int]) -> Tuple[Dict[Hashable, np.ndarray], Dict[Tuple, Dict[str, object]]]:
        """The distinct image variants (their pixels) and conditioning rows of ``positions``."""
        pixels: Dict[Hashable, np.ndarray] = {}
        cond_rows: Dict[Tuple, Dict[str, object]] = {}
        for position in sorted(set(int(p) for p in positions)):
            sample = dataset.sample(position)
            for view in (sample["instance"], sample["class"]):
                if view is None:
                    continue
                pixels.setdefault(view["variant"], view["pixels"])
                row = {"txt": view["prompt"], **{key: view[key] for key in SIZE_KEYS}}
                cond_rows.setdefault(_cond_keys(_as_batch([row]))[0], row)
        return pixels, cond_rows

    def _save(self, path: Path) -> None:
        variants = list(self.moments_by_variant)
        prompts = list(self.crossattn_by_prompt)
        cond_keys = list(self.vector_by_key)
        empty = np.zeros((0,), np.float32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, index=np.array(json.dumps({"variants": variants, "prompts": prompts,
                                                        "cond_keys": cond_keys})),
                         mean=np.stack([self.moments_by_variant[v][0] for v in variants]),
                         std=np.stack([self.moments_by_variant[v][1] for v in variants]),
                         crossattn=np.stack([self.crossattn_by_prompt[p] for p in prompts]) if prompts else empty,
                         vector=np.stack([self.vector_by_key[k] for k in cond_keys]) if cond_keys else empty)
        except OSError as err:
            _logger.warning("could not store the cached inputs in %s (%s); the next run encodes them again",
                            path, err)

    def _load(self, path: Path, pixels: Mapping, cond_rows: Mapping) -> bool:
        """Fill the cache from ``path``; False (nothing filled) when it is missing, unreadable or
        lacks a row this run needs."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                index = json.loads(str(stored["index"]))
                mean, std, crossattn, vector = (stored[k] for k in ("mean", "std", "crossattn", "vector"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError) as err:
            _logger.warning("ignoring the unreadable input cache %s (%s)", path, err)
            return False
        moments = {_as_key(v): (mean[i], std[i]) for i, v in enumerate(index["variants"])}
        by_prompt = {p: crossattn[i] for i, p in enumerate(index["prompts"])}
        by_key = {_as_key(k): vector[i] for i, k in enumerate(index["cond_keys"])}
        if not set(pixels) <= set(moments) or (not self.train_text_encoder and not set(cond_rows) <= set(by_key)):
            return False
        self.moments_by_variant, self.crossattn_by_prompt, self.vector_by_key = moments, by_prompt, by_key
        return True

    def _fill(self, pixels: Mapping[Hashable, np.ndarray], cond_rows: Mapping[Tuple, Dict[str, object]],
              chunk: int) -> None:
        self.moments_by_variant = self._encode_chunks(list(pixels), [pixels[k] for k in pixels], chunk)
        self.crossattn_by_prompt: Dict[str, np.ndarray] = {}
        self.vector_by_key: Dict[Tuple, np.ndarray] = {}
        if not self.train_text_encoder:
            keys = list(cond_rows)
            for start in range(0, len(keys), chunk):
                part = keys[start:start + chunk]
                padded = part + [part[-1]] * (chunk - len(part))
                crossattn, vector = self.encode_conditioning(_as_batch([cond_rows[k] for k in padded]))
                for i, key in enumerate(part):
                    self.crossattn_by_prompt.setdefault(key[0], crossattn[i])
                    self.vector_by_key[key] = vector[i]
        nbytes = sum(m.nbytes + s.nbytes for m, s in self.moments_by_variant.values())
        nbytes += sum(a.nbytes for a in self.crossattn_by_prompt.values())
        nbytes += sum(a.nbytes for a in self.vector_by_key.values())
        _logger.info("cached VAE moments of %d image variants and the conditioning of %d prompts / %d size rows "
                     "(%.1f MB)", len(self.moments_by_variant), len(self.crossattn_by_prompt),
                     len(self.vector_by_key), nbytes / 1e6)

    def _encode_chunks(self, keys: Sequence[Hashable], images: Sequence[np.ndarray],
                       chunk: int) -> Dict[Hashable, Tuple[np.ndarray, np.ndarray]]:
        out = {}
        for start in range(0, len(keys), chunk):
            part = list(images[start:start + chunk])
            count = len(part)
            part += [part[-1]] * (chunk - count)  # whole chunks, as the per-step path
            mean, std = self.moments(np.stack(part))
            for i in range(count):
                out[keys[start + i]] = (mean[i], std[i])
        return out

    def batch_moments(self, batch: Mapping) -> Tuple[np.ndarray, np.ndarray]:
        rows = [self.moments_by_variant[v] for v in _row_variants(batch)]
        return np.stack([m for m, _ in rows]), np.stack([s for _, s in rows])

    def batch_conditioning(self, cond_batch: Mapping) -> Tuple[np.ndarray, np.ndarray]:
        keys = _cond_keys(cond_batch)
        return (np.stack([self.crossattn_by_prompt[k[0]] for k in keys]),
                np.stack([self.vector_by_key[k] for k in keys]))


def _as_key(value):
    """A JSON-decoded key back as the tuples it was written from."""
    return tuple(_as_key(v) for v in value) if isinstance(value, list) else value


def _file_stamp(variant: Tuple) -> List:
    """An image variant's key ``(path, crop, flip)`` plus its file's size and modification time: a
    replaced or regenerated image gets a new key."""
    stat = Path(variant[0]).stat()
    return [*variant, stat.st_size, stat.st_mtime_ns]


def _store_key(identity: Mapping, pixels: Mapping[Hashable, np.ndarray], cond_rows: Mapping, chunk: int,
               train_text_encoder: bool) -> str:
    """16 hex digits naming the cached inputs: what computed them (``identity``: the base weights'
    file, size and mtime, the VAE/conditioner config, MindSpore, the gm/ code) and every row."""
    from gm.compile_cache import source_digest

    material = {"identity": identity, "code": source_digest(), "mindspore": ms.__version__,
                "device": ms.get_context("device_target"), "chunk": chunk, "text_cached": not train_text_encoder,
                "images": [[*_file_stamp(v), list(pixels[v].shape)] for v in pixels],
                "cond": list(cond_rows) if not train_text_encoder else []}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_batch(rows: Sequence[Mapping]) -> Dict[str, object]:
    batch: Dict[str, object] = {"txt": [r["txt"] for r in rows]}
    for key in SIZE_KEYS:
        batch[key] = np.stack([np.asarray(r[key], np.float32) for r in rows])
    return batch


class _Released(nn.Cell):
    """Stands where a frozen module was freed after caching; calling it is a programming error."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} was released after the training inputs were cached")

    def construct(self, *args):
        return self(*args)


def release_frozen_modules(engine: nn.Cell, *, keep_sampling: bool) -> int:
    """Free what a run with :class:`CachedInputs` no longer needs: the VAE encoder, and unless
    images are still sampled during training (validation), the decoder and the conditioner (text
    encoders). Build the loss cell first (it checks the conditioner). Returns the number of
    parameters released."""
    import gc

    vae = engine.first_stage_model
    released = [(vae, "encoder"), (vae, "quant_conv")]
    if not keep_sampling:
        released += [(vae, "decoder"), (vae, "post_quant_conv"), (engine, "conditioner")]
    count = 0
    for owner, name in released:
        count += sum(p.size for p in getattr(owner, name).get_parameters())
        setattr(owner, name, _Released(name))
    gc.collect()  # compiled graphs of the released cells go with them
    _return_freed_heap()
    return count


def _return_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: measured at full size,
    freeing 3.6 GB of text-encoder/VAE weights lowered the RSS by 1.2 GB only)."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to do
            pass
