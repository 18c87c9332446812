"""A PNG of a run's loss and evaluation metrics over steps, drawn with PIL (no plotting library
among the runtime dependencies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
_WIDTH, _PANEL, _MARGIN = 720, 240, 48


def _series(log_path: Path) -> Tuple[List[Tuple[int, float]], Dict[str, List[Tuple[int, float]]]]:
    loss, metrics = [], {}
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        loss.append((record["step"], float(record["loss"])))
        for name, value in (record.get("eval") or {}).items():
            if isinstance(value, (int, float)):
                metrics.setdefault(name, []).append((record["step"], float(value)))
    return loss, metrics


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: Sequence[Tuple[str, List[Tuple[int, float]]]],
           steps: Tuple[int, int]) -> None:
    left, right, bottom = _MARGIN, _WIDTH - 170, top + _PANEL - 28
    values = [v for _, points in series for _, v in points]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = steps
    span = max(1, last - first)

    def xy(step: int, value: float) -> Tuple[float, float]:
        height = (bottom - top - 20) * (value - low) / (high - low)
        return left + (right - left) * (step - first) / span, bottom - height

    draw.rectangle((left, top + 20, right, bottom), outline=(0, 0, 0))
    draw.text((left, top + 4), title, fill=(0, 0, 0))
    draw.text((4, top + 20), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 4), f"step {first}", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 4), f"step {last}", fill=(0, 0, 0))
    for k, (name, points) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        coords = [xy(s, v) for s, v in points]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for x, y in coords if len(coords) < 60 else []:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((right + 10, top + 24 + 14 * k), name, fill=colour)


def plot_run(log_path: str | Path, out_path: str | Path) -> None:
    """Loss (top panel) and every logged evaluation number (bottom) against the step."""
    loss, metrics = _series(Path(log_path))
    steps = (min((s for s, _ in loss), default=0), max((s for s, _ in loss), default=1))
    image = Image.new("RGB", (_WIDTH, 2 * _PANEL), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _panel(draw, 0, "training loss", [("loss", loss)], steps)
    _panel(draw, _PANEL, "evaluation", sorted(metrics.items()), steps)
    image.save(out_path)
