"""MindSpore's persistent graph-compile cache, on by default, in a folder keyed by what the graphs
are a function of.

Graph compilation dominates short runs (the tiny train step: ~50 s cold, a few seconds from the
cache). MindSpore's cache does not know which model config, shapes or version of our code
produced a saved graph. So each
distinct (code, MindSpore version, device, mode, graph-shaping config) gets its own subfolder and
a stale graph can never be picked up: a change to any ``gm/`` source file, the model YAML, LoRA
targets, resolution, batch, precision, ... starts a fresh folder. Values the host feeds into the
graph at run time (learning rates, step counts, seeds, prompts, paths) are not part of the key, so
a second run with other values of those starts warm.

Within a process MindSpore fixes the cache folder at the first cached compile and numbers the
graphs it caches there in compile order; a later process is handed graph N for its N-th cached
compile, whatever that graph is (measured on 2.10: a run that cached graphs A then B, followed by
one that compiles only B, gets A's graph for B -- silently wrong results). A run's sequence of
graphs varies (class images already there, a resumed run skips the first probe, validation
batches), so only the train step -- compiled once per run, the costliest graph -- is cached:
``Cell.compile`` is wrapped to switch the cache on for it and off for every other graph, and the
graphs compiled uncached do not count (measured). Because MindSpore checks nothing when it hands
out a cached graph, the wrapper also writes what the cached train step was compiled for (its
inputs' shapes and dtypes, its parameters' names, shapes, dtypes and trainability) beside it, and
compiles uncached when a later call differs; the file is written after a complete compile, so a
folder without it holds no graph to trust and is cleared before caching into it.

A process that compiled the train step holds MindSpore's compile-time memory to its end and
steps ~30% slower than one that loaded the same graph from the cache (tiny@128: 0.206 vs 0.148 s
per step, 1.51 vs 0.78 GB). So a standalone CPU run on a cold cache compiles it in a short-lived
helper process (:func:`start_compile_helper`, the training script itself with ``--compile_only``)
while it builds and encodes its inputs, then loads the graph.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

_logger = logging.getLogger(__name__)
GM_ROOT = Path(__file__).resolve().parent
# this project's folder in the user cache: compiled graphs here, compiled CPU kernels (native_norms) beside
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl_dreambooth_ms"
DEFAULT_ROOT = USER_CACHE / "compile"
# config keys the host feeds at run time (Parameters or host-side loops): not part of the key
HOST_ONLY_KEYS = {
    ("train", "max_train_steps"), ("train", "seed"), ("train", "save_ckpt_interval"), ("train", "max_num_ckpt"),
    ("train", "num_class_images"), ("train", "prior_loss_weight"), ("train", "snr_gamma"),
    ("train", "noise_offset"), ("sampling", "validation_prompt"), ("sampling", "validation_steps"),
    ("sampling", "negative_prompt"), ("optim", "learning_rate"), ("optim", "text_encoder_lr"),
    ("optim", "lr_scheduler"), ("optim", "lr_warmup_steps"), ("train", "checkpointing_steps"),
    ("train", "checkpoints_total_limit"), ("train", "max_skipped_steps"), ("lora", "format"),
    ("lora", "save_precision"),
}


@functools.cache
def source_digest() -> str:
    """SHA-256 of every gm/ source file: code that computes a cached result (read once per process)."""
    digest = hashlib.sha256()
    for path in sorted([*GM_ROOT.rglob("*.py"), *GM_ROOT.rglob("*.cc"), *GM_ROOT.rglob("*.h")]):
        digest.update(str(path.relative_to(GM_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(config: Mapping[str, Any], **extra: Any) -> str:
    """16 hex digits naming the graphs of ``config`` (a plain dict) plus ``extra`` (mode, device, ...)."""
    import mindspore as ms

    graph_config = {section: ({k: v for k, v in values.items() if (section, k) not in HOST_ONLY_KEYS}
                              if isinstance(values, Mapping) else values)
                    for section, values in config.items()}
    material = json.dumps({"config": graph_config, "extra": extra, "mindspore": ms.__version__,
                           "code": source_digest()}, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def enable_compile_cache(setting: Optional[str], key: str, exclusive: bool = True) -> Optional[Path]:
    """Turn the cache on under ``setting`` (a folder; None: the default root) / ``key``.
    ``exclusive``: this process is the folder's only user this run (not one rank of several, which
    each write a ``rank_N`` subfolder), so it may clear an incomplete compile's files.

    ``setting == "off"`` disables it; when the user set ``MS_COMPILER_CACHE_ENABLE`` themselves,
    their environment decides. Returns the folder in use, or None.
    """
    import mindspore as ms

    if setting is not None and setting.lower() == "off":
        ms.set_context(enable_compile_cache=False)
        return None
    if setting is None and "MS_COMPILER_CACHE_ENABLE" in os.environ:
        if os.environ["MS_COMPILER_CACHE_ENABLE"] not in ("", "0"):
            _logger.warning("MS_COMPILER_CACHE_ENABLE is set: MindSpore's own cache serves every graph by compile "
                            "order, and a run whose graphs come in another order (class images already there, a "
                            "resume) silently gets wrong ones -- unset it to use the script's keyed cache")
        return None
    folder = (Path(setting) if setting else DEFAULT_ROOT) / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _logger.warning("compile cache %s unusable (%s); compiling without it", folder, err)
        return None
    ms.set_context(enable_compile_cache=True, compile_cache_path=str(folder))
    _install_per_graph_switch(folder, exclusive)
    _logger.info("graph compile cache: %s", folder)
    return folder


_ROOT: Optional[Path] = None
_EXCLUSIVE = True
# classes of the cells whose graphs go into the cache: one graph per run, always the first cached
CACHED_GRAPHS = ("TrainStep",)
# what the cached graph was compiled for; written after the compile, so also the "complete" marker
SIGNATURE_FILE = "train_step_signature.json"
HELPER_LOG = "compile_helper.log"


def graph_signature(cell, args: Sequence[Any]) -> dict:
    """What a cached graph of ``cell`` must have been compiled for to be handed to this call: the
    inputs' shapes and dtypes (values for non-tensors) and a digest of the parameters' names,
    shapes, dtypes and trainability (all fixed by the config, as the key; checked because
    MindSpore checks nothing)."""
    params = hashlib.sha256()
    for name, param in cell.parameters_and_names():
        params.update(f"{name}:{tuple(param.shape)}:{param.dtype}:{param.requires_grad};".encode())
    return {"cell": type(cell).__name__, "training": bool(cell.training), "inputs": _describe(list(args)),
            "parameters": params.hexdigest()}


def _describe(value) -> Any:
    """Shapes and dtypes of tensors (values for anything else), nested as the inputs are."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    return repr(value)


def is_warm(folder: Path) -> bool:
    """Whether ``folder`` holds a complete cached train step."""
    return (folder / SIGNATURE_FILE).is_file()


def _install_per_graph_switch(root: Path, exclusive: bool) -> None:
    global _ROOT, _EXCLUSIVE
    from mindspore import nn

    first = _ROOT is None
    _ROOT, _EXCLUSIVE = root, exclusive
    if not first:
        return
    original = nn.Cell.compile

    def compile_cached_only_if_train_step(cell, *args, **kwargs):
        if _ROOT is None:
            return original(cell, *args, **kwargs)
        import mindspore as ms

        if type(cell).__name__ not in CACHED_GRAPHS:
            ms.set_context(enable_compile_cache=False)
            return original(cell, *args, **kwargs)
        # MindSpore calls compile on every call of a graph-mode cell; only a call with new inputs
        # (or another train/eval mode) can compile. The parameters' digest walks every parameter
        # of the model (~5 ms a step at tiny size, measured), so it is taken once per such call.
        handled = cell.__dict__.setdefault("_compile_cache_handled", set())
        call_key = json.dumps([_describe(list(args)), bool(cell.training)])
        if call_key in handled:
            return original(cell, *args, **kwargs)
        handled.add(call_key)
        marker = _ROOT / SIGNATURE_FILE
        signature = graph_signature(cell, args)
        if marker.is_file():
            cached = json.loads(marker.read_text())
            use = cached == signature
            if not use:
                _logger.warning("compile cache %s holds a train step compiled for other inputs or parameters; "
                                "compiling this one without the cache", _ROOT)
            ms.set_context(enable_compile_cache=use)
            return original(cell, *args, **kwargs)
        if _EXCLUSIVE:
            _clear_graphs(_ROOT)  # no marker: whatever is there is an incomplete compile's
        ms.set_context(enable_compile_cache=True)
        result = original(cell, *args, **kwargs)
        from gm.fs import atomic_write_text

        atomic_write_text(marker, json.dumps(signature, sort_keys=True))
        return result

    nn.Cell.compile = compile_cached_only_if_train_step


def _clear_graphs(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.name == HELPER_LOG:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def start_compile_helper(script: Path, argv: List[str], folder: Path) -> subprocess.Popen:
    """Start ``script argv --compile_only`` (it compiles the train step into ``folder`` and exits);
    its output goes to ``folder/compile_helper.log``."""
    log = (folder / HELPER_LOG).open("wb")
    try:
        return subprocess.Popen([sys.executable, str(script), *argv, "--compile_only"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def wait_for_compile_helper(helper: subprocess.Popen, folder: Path) -> bool:
    """Wait for :func:`start_compile_helper`'s process; True when it left a complete train step in
    ``folder``. On failure the train step is compiled here (warned, with the helper's log)."""
    code = helper.wait()
    if code == 0 and is_warm(folder):
        return True
    _logger.warning("the compile helper exited with %d (log: %s); compiling the train step in this process",
                    code, folder / HELPER_LOG)
    return False
