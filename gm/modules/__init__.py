"""SDXL's network parts. ``GeneralConditioner`` is exported here for the YAML target
``gm.modules.GeneralConditioner`` (as in sgm) and imported on first use, so importing a sibling
module (``gm.modules.layers``) does not build the text stack."""

from __future__ import annotations

from typing import Any

__all__ = ["GeneralConditioner"]


def __getattr__(name: str) -> Any:
    if name == "GeneralConditioner":
        from gm.modules.embedders.conditioner import GeneralConditioner

        return GeneralConditioner
    raise AttributeError(f"module 'gm.modules' has no attribute '{name}'")
