"""Prior-preservation class images: top up a folder to the requested count with the base model.

Images already in the folder are kept and counted. Each missing image has a global index that
fixes its file name and its seed, so the result does not depend on the batch size or on how many
data-parallel ranks share the work (rank r generates the indices i with i % world_size == r).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
from tqdm.auto import tqdm

from gm.inference import Sampler, SamplingOptions, save_png

_logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def existing_class_images(folder: Path) -> List[Path]:
    """Image files already in ``folder`` (by extension; unreadable ones are reported when loaded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def missing_class_image_names(folder: Path, num_images: int) -> List[Path]:
    """File names for the images still missing, never clashing with files already there."""
    have = len(existing_class_images(folder))
    taken = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    names: List[Path] = []
    index = 0
    while have + len(names) < num_images:
        name = f"class_{index:05d}.png"
        if name not in taken:
            names.append(folder / name)
        index += 1
    return names


def generate_class_images(sampler: Sampler, folder: str | Path, prompt: str, num_images: int, batch_size: int,
                          options: SamplingOptions, rank: int = 0, world_size: int = 1,
                          barrier: Optional[Callable[[], None]] = None) -> int:
    """Generate this rank's share of the missing class images into ``folder``; returns how many.

    ``options`` gives sampler, steps, guidance and size; each image's seed is
    ``options.seed + global index``. With several ranks, ``barrier`` must be the collective
    barrier: every rank counts the folder before any rank writes to it.
    """
    folder = Path(folder)
    names = missing_class_image_names(folder, num_images)
    if barrier is not None:
        barrier()
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _logger.info("class images: %d in %s, %d to generate for '%s'", num_images - len(names), folder,
                     len(names), prompt)
    mine = [(i, path) for i, path in enumerate(names) if i % world_size == rank]
    bar = tqdm(total=len(mine), desc="class images", disable=rank != 0 or not mine, leave=False)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        noise = np.stack([np.random.default_rng(options.seed + i).standard_normal(options.latent_shape)
                          for i, _ in chunk]).astype(np.float32)
        images = sampler([prompt] * len(chunk), options, noise=noise)
        for (i, path), image in zip(chunk, images):
            settings = {"prompt": prompt, "class_image_index": i, **asdict(replace(options, seed=options.seed + i))}
            save_png(image, path, settings)
        bar.update(len(chunk))
    bar.close()
    if barrier is not None:
        barrier()
    return len(mine)
