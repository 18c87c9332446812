"""All weight loading and saving: file formats, key maps between our names and official ones."""

from gm.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
