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
graphs compiled uncached do not count (measured).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

_logger = logging.getLogger(__name__)
GM_ROOT = Path(__file__).resolve().parent
DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl_dreambooth_ms" / "compile"
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


def source_digest() -> str:
    """SHA-256 of every gm/ source file: code that computes a cached result."""
    digest = hashlib.sha256()
    for path in sorted(GM_ROOT.rglob("*.py")):
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


def enable_compile_cache(setting: Optional[str], key: str) -> Optional[Path]:
    """Turn the cache on under ``setting`` (a folder; None: the default root) / ``key``.

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
    _install_per_graph_switch(folder)
    _logger.info("graph compile cache: %s", folder)
    return folder


_ROOT: Optional[Path] = None
# classes of the cells whose graphs go into the cache: one graph per run, always the first cached
CACHED_GRAPHS = ("TrainStep",)


def _install_per_graph_switch(root: Path) -> None:
    global _ROOT
    from mindspore import nn

    first = _ROOT is None
    _ROOT = root
    if not first:
        return
    original = nn.Cell.compile

    def compile_cached_only_if_train_step(cell, *args, **kwargs):
        if _ROOT is not None:
            import mindspore as ms

            ms.set_context(enable_compile_cache=type(cell).__name__ in CACHED_GRAPHS)
        return original(cell, *args, **kwargs)

    nn.Cell.compile = compile_cached_only_if_train_step
