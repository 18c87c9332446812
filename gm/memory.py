"""How much memory a model needs and the machine has: the rule behind the ``auto`` switches that
trade memory for speed (``--compile_helper``, ``--pynative_jit``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

# Both switches cost memory that grows with the model: the compile helper holds a second copy of
# the model plus the compiler's memory, PyNative jit graphs keep their compiled graphs (measured:
# ~1-5x the fp32 weights at tiny and medium size, and beyond 24 GB at full SDXL size). So only
# small models, where that costs little.
SMALL_MODEL_FRACTION = 1 / 8


def fp32_weight_bytes(model) -> int:
    """Bytes of a model's weights in fp32 (shapes only: a model declared without memory will do)."""
    return sum(4 * math.prod(p.shape) for p in model.get_parameters())


def is_small_model(weight_bytes: int, available: Optional[int]) -> bool:
    """Whether ``weight_bytes`` (``fp32_weight_bytes``) are at most ``SMALL_MODEL_FRACTION`` of
    ``available`` bytes (None: unknown, counted as small)."""
    return available is None or weight_bytes <= SMALL_MODEL_FRACTION * available


def available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
