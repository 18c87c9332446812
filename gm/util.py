"""Config-to-object building (pure functions, no model state)."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from gm.errors import ConfigError


def get_obj_from_str(path: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"target '{path}' must be a dotted path such as 'gm.models.diffusion.DiffusionEngine'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"target '{path}': cannot import module '{module_name}' ({err})") from err
    if not hasattr(module, attr):
        raise ConfigError(f"target '{path}': module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def instantiate_from_config(config: Mapping | DictConfig, **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target:, params:}`` mapping.

    Unknown top-level keys are rejected so a misspelt ``param:`` is not silently ignored.
    """
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping) or "target" not in config:
        raise ConfigError(f"expected a mapping with a 'target' key, got {config!r}")
    unknown = set(config) - {"target", "params"}
    if unknown:
        raise ConfigError(f"config for '{config['target']}' has unknown keys {sorted(unknown)}; "
                         "use 'target' and 'params'")
    cls = get_obj_from_str(config["target"])
    params = dict(config.get("params") or {})
    params.update(extra)
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"cannot build '{config['target']}' from params {sorted(params)}: {err}") from err
