"""Building our C++ kernels for MindSpore ``aot`` custom ops on the CPU target, shared by
``native_norms``, ``native_conv`` and ``native_attention``.

A kernel source is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``)
into the user cache folder, keyed by the hash of the source, the headers beside it
(``native_math.h``), the flags and the libraries it links,
and reused by every later process (compiling takes ~1-2 s).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from mindspore import ops

from gm.compile_cache import USER_CACHE

_logger = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_ROOT = USER_CACHE / "kernels"
# -O3 without -march=native: the cache folder may be shared by machines of different CPUs
COMPILE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++14", "-pthread")


def compiler() -> Optional[str]:
    """The C++ compiler's path, or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build_library(source: Path, cache_root: Path = CACHE_ROOT, link: Sequence[str] = ()) -> Path:
    """Compile ``source`` into ``cache_root/<hash>/<name>.so`` unless it is there; ``link`` are
    extra linker arguments (libraries the kernels call).

    Raises ``RuntimeError`` when there is no compiler or it fails.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    flags = [*COMPILE_FLAGS, *link]
    # the headers beside the source (native_math.h) are part of what is compiled
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_root / digest / f"{source.stem}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # concurrent processes (data-parallel ranks, the compile helper) each build a private file and
    # rename it into place, so no process ever loads a half-written library
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cxx, *COMPILE_FLAGS, "-o", partial, str(source), *link],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{cxx} failed on {source}: {result.stderr.strip()[:500]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def load_or_fall_back(switch: str, load: Callable[[], T], what: str, fallback: str) -> Optional[T]:
    """``load()`` (build and wrap the kernels), or None when the environment variable ``switch`` is
    ``0`` or building fails (logged once per caller: "<what> unavailable (<reason>); <fallback>")."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        return load()
    except (OSError, RuntimeError) as err:
        _logger.warning("%s unavailable (%s); %s", what, err, fallback)
        return None


class KernelOp(ops.Custom):
    """An aot custom op running ``symbol`` of ``library``, named ``variant`` in the graph.

    Ops of one kernel function that differ in arity, output shapes or bprop (a linear layer with or
    without a bias, convolutions of several strides) need distinct ``variant`` names: MindSpore 2.10
    shares the graph of a custom op's bprop between ops of equal attributes (measured: the second
    variant in a graph was given the first one's bprop, and compilation failed on its arity).

    ``copy.deepcopy`` shares the op instead of copying it: it holds no state, and MindSpore's
    ``Primitive.__deepcopy__`` cannot rebuild a ``Custom`` (the shared block graphs of
    ``gm.modules.shared_graphs`` deep-copy blocks).
    """

    def __init__(self, library: str, symbol: str, variant: str, **kwargs):
        super().__init__(f"{library}:{symbol}", func_type="aot", **kwargs)
        self.add_prim_attr("kernel_variant", variant)

    def __deepcopy__(self, memo):
        return self
