"""DreamBooth data: instance (and optional class) photos -> pixel batches with SDXL micro-conditioning.

Host-side only (numpy + PIL). The preprocessing follows diffusers'
``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (``DreamBoothDataset``):

* ``exif_transpose``, then RGB; the loaded image's ``(h, w)`` is ``original_size_as_tuple``;
* resize the shorter side to ``resolution`` (torchvision ``Resize(int)`` arithmetic: the longer
  side becomes ``int(resolution * long / short)``), LANCZOS by default as diffusers'
  ``--image_interpolation_mode`` default;
* optional horizontal flip of the resized image, *before* the crop; the crop coordinates are
  those in the (flipped) resized image and are not mirrored, as diffusers;
* center crop (``top = int(round((h - R) / 2))``, Python rounding as torchvision ``CenterCrop``) or
  a uniform random crop; ``crop_coords_top_left = (top, left)``, ``target_size_as_tuple = (R, R)``
  (sgm's ``(top, left)`` / ``(h, w)`` order);
* pixels ``(x / 255 - 0.5) / 0.5`` -> float32 ``(3, R, R)`` in [-1, 1].

Deliberate differences from diffusers, each an improvement that does not change instance images:
class images get micro-conditioning from their own size and crop (diffusers reuses the instance
image's); images with an alpha channel are composited over white (diffusers' ``convert("RGB")``
keeps whatever colour hides under transparent pixels); 16-bit images are scaled to 8 bits (PIL's
``convert`` clips them); the crop and flip are drawn afresh for every sample from the seed (diffusers
draws them once per image at start-up). Class images are not flipped, as diffusers.

Sample order: see :class:`PairSchedule`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from gm.errors import ConfigError

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Independent random streams derived from one seed (numpy SeedSequence entropy words).
_ORDER_STREAM, _CLASS_STREAM, _AUGMENT_STREAM = 0, 1, 2
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------
# Files and decoding
# --------------------------------------------------------------------------------------------


def list_image_files(folder: PathLike) -> List[Path]:
    """Files in ``folder`` (not recursive) with an image extension, any case, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited over white, 16-bit scaled to 8-bit, CMYK/L/P converted."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert() clips 16-bit values at 255; scale 0..65535 -> 0..255 instead.
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 or image.mode != "I" else 1.0
        gray = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb(path: PathLike) -> Image.Image:
    """Decode ``path`` fully: EXIF orientation applied, converted to RGB (see :func:`_to_rgb`).

    Raises whatever PIL raises for an unreadable or truncated file (``OSError``, ``ValueError``,
    ``Image.DecompressionBombError``, ...).
    """
    with Image.open(path) as image:
        image.load()
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as err:  # noqa: BLE001 - a malformed EXIF block should not lose a good photo
            _logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, err)
        return _to_rgb(image)


def read_caption(image_path: PathLike, default: str) -> str:
    """The sidecar caption ``<image stem>.txt`` beside the image (stripped), else ``default``."""
    sidecar = Path(image_path).with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8").strip()
        if text:
            return text
    return default


def _existing_folder(folder: PathLike, flag: str) -> Path:
    path = Path(folder)
    if not path.exists():
        raise ConfigError(f"{flag} {path}: folder does not exist; point {flag} at a folder of photos "
                          f"({', '.join(IMAGE_EXTENSIONS)})")
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a folder; point {flag} at the folder that holds the photos")
    return path


def _scan(folder: PathLike, flag: str, decode: Callable[[Path], object], limit: Optional[int] = None) -> List[Path]:
    """Readable image files of ``folder`` in name order (at most ``limit``); unreadable ones are logged.

    Raises ConfigError when the folder is missing, empty, or holds no readable image.
    """
    path = _existing_folder(folder, flag)
    files = sorted(p for p in path.iterdir() if p.is_file())
    if not files:
        raise ConfigError(f"{flag} {path}: folder is empty; put the photos ({', '.join(IMAGE_EXTENSIONS)}) in it")
    readable, unreadable = [], []
    for candidate in (p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS):
        if limit is not None and len(readable) >= limit:
            break
        try:
            decode(candidate)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
            unreadable.append(candidate)
            _logger.warning("skipping unreadable image %s (%s: %s)", candidate, type(err).__name__, err)
            continue
        readable.append(candidate)
    if not readable:
        others = len(files) - len(unreadable)
        raise ConfigError(
            f"{flag} {path}: no readable image among {len(files)} files ({len(unreadable)} image files failed to "
            f"decode, {others} without an image extension {'/'.join(IMAGE_EXTENSIONS)}); add valid photos")
    if unreadable:
        _logger.warning("%s %s: skipped %d unreadable of %d image files: %s", flag, path, len(unreadable),
                        len(unreadable) + len(readable), ", ".join(p.name for p in unreadable))
    return readable


def validate_image_folder(path: PathLike, flag: str) -> List[Path]:
    """The readable images of ``path`` (decoded once to check), sorted; ConfigError naming ``flag`` if none."""
    return _scan(path, flag, open_rgb)


def validate_instance_folder(path: PathLike, flag: str = "--instance_data_path") -> List[Path]:
    """Early check of the instance folder (before any model is built); returns its readable images."""
    return validate_image_folder(path, flag)


def count_images(folder: PathLike) -> int:
    """How many readable images ``folder`` holds (0 when it is missing or empty), for class-image generation."""
    path = Path(folder)
    if not path.is_dir():
        return 0
    count = 0
    for candidate in list_image_files(path):
        try:
            open_rgb(candidate)
        except Exception:  # noqa: BLE001 - unreadable files are not counted
            continue
        count += 1
    return count


# --------------------------------------------------------------------------------------------
# Geometry: resize, crop, flip
# --------------------------------------------------------------------------------------------


def resized_size(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """(h, w) after resizing the shorter side to ``resolution`` (torchvision ``Resize(int)`` rounding down)."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def resize_shorter_side(image: Image.Image, resolution: int, interpolation: str = "lanczos") -> Image.Image:
    """Resize so the shorter side equals ``resolution``; aspect ratio kept."""
    height, width = resized_size(image.height, image.width, resolution)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), INTERPOLATIONS[interpolation])


@dataclass(frozen=True)
class Crop:
    """Where a sample is cut from the resized image: ``(top, left)`` in the (flipped) resized image."""

    top: int
    left: int
    flip: bool


def choose_crop(height: int, width: int, resolution: int, *, center_crop: bool, random_flip: bool,
                rng: np.random.Generator) -> Crop:
    """Crop of a resized ``(height, width)`` image to ``resolution`` square (diffusers' conventions)."""
    # Always draw the same three numbers so the stream does not depend on the options.
    flip_draw = rng.random()
    top_draw = rng.integers(0, height - resolution + 1)
    left_draw = rng.integers(0, width - resolution + 1)
    if center_crop:
        top = max(0, int(round((height - resolution) / 2.0)))
        left = max(0, int(round((width - resolution) / 2.0)))
    else:
        top, left = int(top_draw), int(left_draw)
    return Crop(top=top, left=left, flip=bool(random_flip and flip_draw < 0.5))


def crop_pixels(resized: np.ndarray, crop: Crop, resolution: int) -> np.ndarray:
    """uint8 ``(H, W, 3)`` resized image -> float32 ``(3, R, R)`` in [-1, 1], flipped before cropping."""
    if crop.flip:
        resized = resized[:, ::-1]
    patch = resized[crop.top:crop.top + resolution, crop.left:crop.left + resolution]
    pixels = (patch.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------
# Order: pairs, shuffling, sharding, resume
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairIndex:
    """One (instance, class) pair of the sample stream; ``class_index`` is -1 without class images."""

    position: int
    epoch: int
    instance_index: int
    class_index: int


class PairSchedule:
    """The sample order, a pure function of the seed: no state, so any step can be recomputed.

    An epoch holds every instance image ``repeats`` times, shuffled by a permutation drawn from
    ``(seed, epoch)``. Epochs are laid end to end into one global stream of positions 0, 1, 2, ...
    Each position is paired with a class image: class images are used in cycles, each cycle a fresh
    permutation from ``(seed, cycle)``, so every class image is used once before any is reused.

    Data parallelism: global step ``s`` consumes positions ``[s*W*B, (s+1)*W*B)``; rank ``r`` takes
    the ``r``-th block of ``B`` of them. Ranks therefore see disjoint parts of every epoch that
    together cover it, each in its own order, and the union over ranks at a step depends only on
    ``W*B`` (the same run for 1 rank x batch 4 and 2 ranks x batch 2). Resuming at step ``s`` just
    starts there. Crop/flip randomness is drawn from ``(seed, position)``, so it is reproducible too.
    """

    def __init__(self, num_instance_images: int, *, repeats: int = 1, num_class_images: int = 0, seed: int = 0):
        if num_instance_images < 1 or repeats < 1 or num_class_images < 0 or seed < 0:
            raise ConfigError(f"PairSchedule needs >= 1 instance image, repeats >= 1, >= 0 class images and seed "
                              f">= 0; got {num_instance_images}, {repeats}, {num_class_images}, {seed}")
        self.num_instance_images = num_instance_images
        self.repeats = repeats
        self.num_class_images = num_class_images
        self.seed = seed
        self.pairs_per_epoch = num_instance_images * repeats
        self._epoch_order = lru_cache(maxsize=4)(self._compute_epoch_order)
        self._class_cycle = lru_cache(maxsize=4)(self._compute_class_cycle)

    def _compute_epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _ORDER_STREAM, epoch])
        return rng.permutation(self.pairs_per_epoch) % self.num_instance_images

    def _compute_class_cycle(self, cycle: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _CLASS_STREAM, cycle])
        return rng.permutation(self.num_class_images)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Instance index at each position of ``epoch``: int64 ``(pairs_per_epoch,)``."""
        return self._epoch_order(epoch).copy()

    def pair(self, position: int) -> PairIndex:
        """The pair at global stream ``position``."""
        epoch, offset = divmod(position, self.pairs_per_epoch)
        class_index = -1
        if self.num_class_images:
            cycle, slot = divmod(position, self.num_class_images)
            class_index = int(self._class_cycle(cycle)[slot])
        return PairIndex(position, epoch, int(self._epoch_order(epoch)[offset]), class_index)

    def positions(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
        """Global positions rank ``rank`` of ``world_size`` uses at global ``step``."""
        if not 0 <= rank < world_size or batch_size < 1 or step < 0:
            raise ValueError(f"need 0 <= rank < world_size, batch_size >= 1, step >= 0; got rank {rank}, "
                             f"world_size {world_size}, batch_size {batch_size}, step {step}")
        start = (step * world_size + rank) * batch_size
        return range(start, start + batch_size)


# --------------------------------------------------------------------------------------------
# Dataset and collation
# --------------------------------------------------------------------------------------------

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


@dataclass(frozen=True)
class _Loaded:
    resized: np.ndarray  # uint8 (H', W', 3), shorter side == resolution
    original_size: Tuple[int, int]  # (h, w) after EXIF transpose


class DreamBoothDataset:
    """Instance photos (+ optional class photos) -> samples and batches, in :class:`PairSchedule` order.

    Args:
        instance_dir: folder of subject photos; ``<stem>.txt`` sidecars override ``instance_prompt``.
        instance_prompt: caption for instance photos without a sidecar, e.g. ``"a photo of sks dog"``.
        class_dir: folder of class photos for prior preservation, or None (no ``class_*`` entries).
        class_prompt: caption for class photos without a sidecar; required with ``class_dir``.
        resolution: square training size R.
        center_crop: center crop (True) or random crop (False), as diffusers' ``--center_crop``.
        random_flip: flip instance samples horizontally with probability 0.5.
        repeats: times each instance photo appears per epoch.
        num_class_images: use at most this many class photos (first in name order); None: all.
        interpolation: resize filter, one of :data:`INTERPOLATIONS` (diffusers' default ``lanczos``).
        seed: seeds the order and the crops/flips (>= 0).
        cache_bytes: keep resized images in memory up to this many bytes (decode each file once).
    """

    def __init__(self, instance_dir: PathLike, instance_prompt: str, *, class_dir: Optional[PathLike] = None,
                 class_prompt: Optional[str] = None, resolution: int = 1024, center_crop: bool = False,
                 random_flip: bool = False, repeats: int = 1, num_class_images: Optional[int] = None,
                 interpolation: str = "lanczos", seed: int = 0, cache_bytes: int = 2 << 30):
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if resolution < 8:
            raise ConfigError(f"--resolution {resolution}: must be >= 8")
        if class_dir is not None and not class_prompt:
            raise ConfigError("--class_prompt is required when --class_data_path is given (prior preservation)")
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.interpolation = interpolation
        self._cache: Dict[Path, _Loaded] = {}
        self._cache_left = cache_bytes
        self.instance_paths = _scan(instance_dir, "--instance_data_path", self._load)
        self.instance_prompts = [read_caption(p, instance_prompt) for p in self.instance_paths]
        self.class_paths: List[Path] = []
        self.class_prompts: List[str] = []
        if class_dir is not None:
            self.class_paths = _scan(class_dir, "--class_data_path", self._load, limit=num_class_images)
            self.class_prompts = [read_caption(p, class_prompt) for p in self.class_paths]
        self.schedule = PairSchedule(len(self.instance_paths), repeats=repeats,
                                     num_class_images=len(self.class_paths), seed=seed)
        _logger.info("DreamBooth data: %d instance images x %d repeats, %d class images, resolution %d",
                     len(self.instance_paths), repeats, len(self.class_paths), resolution)

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_paths)

    def __len__(self) -> int:
        """Pairs per epoch (instance images x repeats)."""
        return self.schedule.pairs_per_epoch

    def _load(self, path: Path) -> _Loaded:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        image = open_rgb(path)
        original_size = (image.height, image.width)
        resized = np.asarray(resize_shorter_side(image, self.resolution, self.interpolation), dtype=np.uint8)
        loaded = _Loaded(resized, original_size)
        if resized.nbytes <= self._cache_left:
            self._cache[path] = loaded
            self._cache_left -= resized.nbytes
        return loaded

    def _view(self, path: Path, prompt: str, rng: np.random.Generator, allow_flip: bool) -> Dict[str, object]:
        try:
            loaded = self._load(path)
        except Exception as err:  # noqa: BLE001 - it decoded at start-up; say which file changed
            raise ConfigError(f"{path}: could not be read any more ({type(err).__name__}: {err}); "
                              "restore or remove it and restart") from err
        height, width = loaded.resized.shape[:2]
        crop = choose_crop(height, width, self.resolution, center_crop=self.center_crop,
                           random_flip=self.random_flip and allow_flip, rng=rng)
        return {
            "pixels": crop_pixels(loaded.resized, crop, self.resolution),
            "prompt": prompt,
            "original_size_as_tuple": np.array(loaded.original_size, np.float32),
            "crop_coords_top_left": np.array((crop.top, crop.left), np.float32),
            "target_size_as_tuple": np.array((self.resolution, self.resolution), np.float32),
            "flipped": crop.flip,
            # what the pixels are a function of: the latent cache's key
            "variant": (str(path), crop.top, crop.left, crop.flip),
        }

    def sample(self, position: int) -> Dict[str, object]:
        """The processed pair at global stream ``position``.

        Returns ``{"instance": view, "class": view or None, "pair": PairIndex}``; a view holds
        ``pixels`` float32 (3, R, R) in [-1, 1], ``prompt``, the three float32 (2,) size entries
        (:data:`SIZE_KEYS`), ``flipped`` and ``variant`` (``(path, top, left, flip)``: the pixels
        are a function of it).
        """
        pair = self.schedule.pair(position)
        rng = np.random.default_rng([self.schedule.seed, _AUGMENT_STREAM, position])
        instance = self._view(self.instance_paths[pair.instance_index], self.instance_prompts[pair.instance_index],
                              rng, allow_flip=True)
        class_view = None
        if pair.class_index >= 0:
            # Class images are not flipped (diffusers' class transform has no flip).
            class_view = self._view(self.class_paths[pair.class_index], self.class_prompts[pair.class_index],
                                    rng, allow_flip=False)
        return {"instance": instance, "class": class_view, "pair": pair}

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Dict[str, object]:
        """The batch rank ``rank`` of ``world_size`` trains on at global ``step`` (see :func:`collate`)."""
        return collate([self.sample(p) for p in self.schedule.positions(step, batch_size, rank, world_size)])

    def batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                start_step: int = 0) -> Iterator[Dict[str, object]]:
        """Endless batches from ``start_step`` on (resume = start at the saved global step)."""
        step = start_step
        while True:
            yield self.batch(step, batch_size, rank, world_size)
            step += 1


def collate(samples: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """Stack :meth:`DreamBoothDataset.sample` outputs into a batch of B.

    Returns ``instance_pixels`` float32 (B, 3, R, R); ``instance_prompts`` list of B str;
    ``instance_<k>`` float32 (B, 2) for k in :data:`SIZE_KEYS`; ``instance_indices`` and
    ``positions`` int64 (B,); ``instance_variants`` (B image-variant keys, see
    :meth:`DreamBoothDataset.sample`); and, when the samples have class views, the same
    ``class_*`` entries (``class_pixels``, ``class_prompts``, ``class_<k>``, ``class_variants``,
    ``class_indices``).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: Dict[str, object] = {
        "positions": np.array([s["pair"].position for s in samples], np.int64),
        "instance_indices": np.array([s["pair"].instance_index for s in samples], np.int64),
    }
    kinds = ["instance"] + (["class"] if samples[0]["class"] is not None else [])
    for kind in kinds:
        views = [s[kind] for s in samples]
        batch[f"{kind}_pixels"] = np.stack([v["pixels"] for v in views])
        batch[f"{kind}_prompts"] = [v["prompt"] for v in views]
        batch[f"{kind}_variants"] = [v["variant"] for v in views]
        for key in SIZE_KEYS:
            batch[f"{kind}_{key}"] = np.stack([v[key] for v in views])
    if "class" in kinds:
        batch["class_indices"] = np.array([s["pair"].class_index for s in samples], np.int64)
    return batch


def model_inputs(batch: Mapping[str, object]) -> Tuple[np.ndarray, Dict[str, object]]:
    """A collated batch -> (pixels, conditioner batch), instance rows first then class rows.

    Returns pixels float32 (B or 2B, 3, R, R) and ``{"txt": prompts, "original_size_as_tuple",
    "crop_coords_top_left", "target_size_as_tuple"}`` (float32 (B or 2B, 2)), the keys
    :class:`gm.modules.embedders.conditioner.GeneralConditioner` reads. With prior preservation the
    instance and class halves run as one batch of 2B (one forward instead of two), as diffusers.
    """
    kinds = ["instance"] + (["class"] if "class_pixels" in batch else [])
    pixels = np.concatenate([batch[f"{kind}_pixels"] for kind in kinds])
    cond: Dict[str, object] = {"txt": [p for kind in kinds for p in batch[f"{kind}_prompts"]]}
    for key in SIZE_KEYS:
        cond[key] = np.concatenate([batch[f"{kind}_{key}"] for kind in kinds])
    return pixels, cond
