"""The "toy world": captioned photos of a few object classes, drawn with PIL from a seed (no downloads).

A small base model pretrained on this world (``tools/pretrain_toy_world.py``) knows what "a photo
of a red ball on a beach" looks like, so DreamBooth on the built-in subject (the striped robot of
:mod:`gm.data.toy_subject`) can be seen to work on a machine that never sees real SDXL weights.

Classes (:data:`CLASSES`): ``toy`` (robots, teddy bears and rockets), ``ball``, ``cup`` and
``dog`` (a dog-like figure). Each photo varies the class, colour, pattern, scene (the subject's
backgrounds), position, scale, tilt and light, all drawn from ``(seed, index)``. The subject is a
*specific* toy that the world never shows: world robots never have a body of red and yellow
stripes (:func:`is_subject_like` checks a drawn item's attributes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from gm.data.toy_subject import _SUPERSAMPLE, BACKGROUNDS, _background, _jitter

Color = Tuple[int, int, int]

CLASSES = ("toy", "ball", "cup", "dog")
COLOURS: Dict[str, Color] = {
    "red": (206, 40, 40), "orange": (240, 130, 30), "yellow": (245, 200, 45), "green": (50, 160, 70),
    "blue": (40, 100, 210), "purple": (130, 60, 170), "pink": (235, 120, 170), "white": (235, 235, 230),
    "black": (40, 40, 45), "brown": (130, 80, 45),
}
PATTERNS = ("plain", "striped", "dotted")
_INK = (25, 25, 30)


@dataclass(frozen=True)
class WorldItem:
    """What one photo shows: the object's class, kind (e.g. ``robot`` within ``toy``), main colour,
    second colour (of the pattern), pattern and the scene."""

    cls: str
    kind: str
    colour: str
    second: str
    pattern: str
    scene: str

    @property
    def caption(self) -> str:
        """``"a photo of a red ball on a beach"`` (the pattern is named when there is one)."""
        return self.caption_naming()

    def caption_naming(self, colour: bool = True, pattern: bool = True, scene: bool = True) -> str:
        """The caption naming only the chosen attributes: ``caption_naming(False, False, False)`` is
        ``"a photo of a ball"``, the class prompt DreamBooth uses."""
        words = ["a photo of a"]
        if pattern and self.pattern != "plain":
            words.append(self.pattern)
        if colour:
            words.append(self.colour)
        words.append(self.cls)
        text = " ".join(words)
        return f"{text} on a {self.scene}" if scene else text


def is_subject_like(item: WorldItem) -> bool:
    """Whether ``item`` could pass for the DreamBooth subject (a robot striped red and yellow)."""
    return (item.kind == "robot" and item.pattern == "striped"
            and {item.colour, item.second} == {"red", "yellow"})


def _pattern_fill(layer: Image.Image, mask: Image.Image, pattern: str, second: Color, unit: int,
                  rng: np.random.Generator) -> None:
    """Paint ``pattern`` in ``second`` over ``layer`` where ``mask`` is set (plain: nothing)."""
    if pattern == "plain":
        return
    overlay = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    step = max(2, int(unit * rng.uniform(1.2, 1.8)))
    if pattern == "striped":
        for y in range(0, layer.height, 2 * step):
            draw.rectangle((0, y, layer.width, y + step - 1), fill=(*second, 255))
    else:  # dotted
        radius = max(1, step // 3)
        for row, y in enumerate(range(step // 2, layer.height, step)):
            for x in range(step // 2 + (row % 2) * step // 2, layer.width, step):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(*second, 255))
    layer.paste(overlay, (0, 0), ImageChops.multiply(overlay.getchannel("A"), mask))  # inside the shape only


def _shape_layer(size: Tuple[int, int]) -> Tuple[Image.Image, Image.Image, ImageDraw.ImageDraw,
                                                  ImageDraw.ImageDraw]:
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    mask = Image.new("L", size, 0)
    return layer, mask, ImageDraw.Draw(layer), ImageDraw.Draw(mask)


def _ball(u: int, main: Color, second: Color, pattern: str, rng: np.random.Generator) -> Image.Image:
    layer, mask, draw, mdraw = _shape_layer((10 * u, 10 * u))
    box = (0.3 * u, 0.3 * u, 9.7 * u, 9.7 * u)
    draw.ellipse(box, fill=main)
    mdraw.ellipse(box, fill=255)
    _pattern_fill(layer, mask, pattern, second, u, rng)
    draw.ellipse((2.2 * u, 2.0 * u, 4.0 * u, 3.6 * u), fill=(255, 255, 255, 150))  # highlight
    draw.ellipse(box, outline=_INK, width=max(1, u // 4))
    return layer


def _cup(u: int, main: Color, second: Color, pattern: str, rng: np.random.Generator) -> Image.Image:
    layer, mask, draw, mdraw = _shape_layer((12 * u, 11 * u))
    line = max(1, u // 4)
    draw.ellipse((7.0 * u, 3.0 * u, 11.2 * u, 8.0 * u), outline=main, width=max(2, u))  # handle
    body = [(1.0 * u, 1.5 * u), (9.0 * u, 1.5 * u), (8.0 * u, 10.5 * u), (2.0 * u, 10.5 * u)]
    draw.polygon(body, fill=main)
    mdraw.polygon(body, fill=255)
    _pattern_fill(layer, mask, pattern, second, u, rng)
    draw.polygon(body, outline=_INK, width=line)
    draw.ellipse((1.0 * u, 0.8 * u, 9.0 * u, 2.2 * u), fill=(60, 40, 30), outline=_INK, width=line)  # coffee
    return layer


def _dog(u: int, main: Color, second: Color, pattern: str, rng: np.random.Generator) -> Image.Image:
    layer, mask, draw, mdraw = _shape_layer((16 * u, 11 * u))
    parts = [("ellipse", (3.0 * u, 3.5 * u, 12.0 * u, 7.5 * u))]  # body
    parts += [("rect", (x, 6.5 * u, x + 1.3 * u, 10.5 * u)) for x in (3.8 * u, 5.6 * u, 9.2 * u, 10.8 * u)]  # legs
    parts += [("ellipse", (10.5 * u, 0.8 * u, 15.0 * u, 5.0 * u))]  # head
    for kind, box in parts:
        (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=main)
        (mdraw.ellipse if kind == "ellipse" else mdraw.rectangle)(box, fill=255)
    _pattern_fill(layer, mask, pattern, second, u, rng)
    draw.line((3.2 * u, 4.5 * u, 1.0 * u, 2.0 * u), fill=main, width=max(2, u))  # tail
    draw.polygon([(11.0 * u, 1.6 * u), (11.8 * u, 0.0), (12.6 * u, 1.4 * u)], fill=_INK)  # ears
    draw.polygon([(13.2 * u, 1.3 * u), (14.0 * u, 0.0), (14.6 * u, 1.6 * u)], fill=_INK)
    draw.ellipse((13.3 * u, 2.2 * u, 13.9 * u, 2.8 * u), fill=_INK)  # eye
    draw.ellipse((14.5 * u, 3.2 * u, 15.2 * u, 3.8 * u), fill=_INK)  # nose
    return layer


def _robot(u: int, main: Color, second: Color, pattern: str, rng: np.random.Generator) -> Image.Image:
    layer, mask, draw, mdraw = _shape_layer((10 * u, 16 * u))
    line = max(1, u // 6)
    head = _jitter(rng, (200, 200, 205), 30)
    draw.line((5 * u, 0.9 * u, 5 * u, 2.2 * u), fill=_INK, width=line)
    draw.ellipse((4.4 * u, 0.2 * u, 5.6 * u, 1.4 * u), fill=second, outline=_INK, width=line)
    draw.rounded_rectangle((2.8 * u, 2.0 * u, 7.2 * u, 5.2 * u), radius=0.6 * u, fill=head, outline=_INK, width=line)
    for cx in (4.0 * u, 6.0 * u):
        draw.ellipse((cx - 0.5 * u, 3.0 * u, cx + 0.5 * u, 4.0 * u), fill=_INK)
    for x0 in (0.9 * u, 7.9 * u):
        draw.rectangle((x0, 6.0 * u, x0 + 1.2 * u, 9.6 * u), fill=head, outline=_INK, width=line)
    for x0 in (3.3 * u, 5.5 * u):
        draw.rectangle((x0, 12.0 * u, x0 + 1.2 * u, 15.6 * u), fill=_INK)
    body = (2.2 * u, 5.6 * u, 7.8 * u, 12.2 * u)
    draw.rectangle(body, fill=main)
    mdraw.rectangle(body, fill=255)
    _pattern_fill(layer, mask, pattern, second, u, rng)
    draw.rectangle(body, outline=_INK, width=line)
    return layer


def _teddy(u: int, main: Color, second: Color, pattern: str, rng: np.random.Generator) -> Image.Image:
    layer, mask, draw, mdraw = _shape_layer((12 * u, 15 * u))
    circles = [(1.5, 0.5, 4.0, 3.0), (8.0, 0.5, 10.5, 3.0), (2.5, 1.0, 9.5, 7.5), (2.0, 6.5, 10.0, 14.5),
               (0.0, 7.5, 3.5, 11.0), (8.5, 7.5, 12.0, 11.0)]
    for x0, y0, x1, y1 in circles:
        box = (x0 * u, y0 * u, x1 * u, y1 * u)
        draw.ellipse(box, fill=main)
        mdraw.ellipse(box, fill=255)
    _pattern_fill(layer, mask, pattern, second, u, rng)
    draw.ellipse((4.5 * u, 4.2 * u, 7.5 * u, 6.6 * u), fill=(235, 215, 185))  # muzzle
    for cx in (4.6 * u, 7.4 * u):
        draw.ellipse((cx - 0.45 * u, 2.8 * u, cx + 0.45 * u, 3.7 * u), fill=_INK)
    draw.ellipse((5.5 * u, 4.5 * u, 6.5 * u, 5.3 * u), fill=_INK)
    return layer


def _rocket(u: int, main: Color, second: Color, pattern: str, rng: np.random.Generator) -> Image.Image:
    layer, mask, draw, mdraw = _shape_layer((8 * u, 16 * u))
    body = (2.0 * u, 3.0 * u, 6.0 * u, 13.0 * u)
    draw.rectangle(body, fill=main)
    mdraw.rectangle(body, fill=255)
    _pattern_fill(layer, mask, pattern, second, u, rng)
    draw.polygon([(2.0 * u, 3.0 * u), (4.0 * u, 0.0), (6.0 * u, 3.0 * u)], fill=second, outline=_INK)  # nose
    draw.polygon([(2.0 * u, 10.0 * u), (0.0, 14.0 * u), (2.0 * u, 13.0 * u)], fill=second, outline=_INK)  # fins
    draw.polygon([(6.0 * u, 10.0 * u), (8.0 * u, 14.0 * u), (6.0 * u, 13.0 * u)], fill=second, outline=_INK)
    draw.ellipse((3.0 * u, 5.0 * u, 5.0 * u, 7.0 * u), fill=(170, 220, 250), outline=_INK)  # window
    draw.polygon([(2.6 * u, 13.0 * u), (4.0 * u, 15.8 * u), (5.4 * u, 13.0 * u)], fill=(250, 160, 40))  # flame
    draw.rectangle(body, outline=_INK, width=max(1, u // 6))
    return layer


# class -> its kinds and their drawing functions (unit, main colour, second colour, pattern, rng)
_KINDS: Dict[str, Dict[str, Callable[..., Image.Image]]] = {
    "toy": {"robot": _robot, "teddy": _teddy, "rocket": _rocket},
    "ball": {"ball": _ball},
    "cup": {"cup": _cup},
    "dog": {"dog": _dog},
}
# Relative height of each kind in the frame (a ball is smaller than a standing robot). The objects
# fill most of the frame: at 64x64 the latent is 8x8, and an object a few latent pixels tall is a
# blob to the tiny model (measured: objects a fifth to a half of the frame tall, class accuracy of
# the base's samples 0.26, chance 0.25).
_HEIGHT = {"robot": (0.55, 0.85), "teddy": (0.5, 0.8), "rocket": (0.55, 0.85), "ball": (0.4, 0.65),
           "cup": (0.42, 0.65), "dog": (0.4, 0.6)}


def draw_world_item(rng: np.random.Generator) -> WorldItem:
    """Draw one item's attributes (never subject-like: a subject-like draw is redrawn)."""
    while True:
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        kinds = sorted(_KINDS[cls])
        kind = kinds[int(rng.integers(len(kinds)))]
        names = sorted(COLOURS)
        colour, second = (names[int(i)] for i in rng.choice(len(names), 2, replace=False))
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        scene = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        item = WorldItem(cls, kind, colour, second, pattern, scene)
        if not is_subject_like(item):
            return item


def world_caption(item: WorldItem, index: int, *, seed: int = 0, omit_rate: float = 0.0) -> str:
    """The training caption of photo ``index``: each of its colour, pattern and scene is left out
    with probability ``omit_rate`` (independently, drawn from ``(seed, index)``). Captions that
    always name every attribute leave "a photo of a toy" outside the training distribution; the
    model then draws the average of its toys (one brownish blob) for DreamBooth's class and
    instance prompts, where real captions at every level of detail teach SDXL the whole class."""
    rng = np.random.default_rng([seed, 0xCA9, index])
    colour, pattern, scene = (bool(keep) for keep in rng.random(3) >= omit_rate)
    return item.caption_naming(colour=colour, pattern=pattern, scene=scene)


def render_world_photo(index: int, *, size: int = 64, seed: int = 0) -> Tuple[Image.Image, WorldItem]:
    """Photo ``index`` of the world: RGB ``size`` x ``size`` and what it shows, drawn from ``(seed, index)``."""
    rng = np.random.default_rng([seed, 0x70E, index])
    item = draw_world_item(rng)
    canvas = size * _SUPERSAMPLE
    horizon = int(canvas * rng.uniform(0.45, 0.62))
    scene = _background(item.scene, canvas, horizon, rng).convert("RGBA")
    low, high = _HEIGHT[item.kind]
    height = int(canvas * rng.uniform(low, high))
    draw = _KINDS[item.cls][item.kind]
    probe = draw(16, COLOURS[item.colour], COLOURS[item.second], item.pattern, np.random.default_rng(0))
    unit = max(2, int(16 * height / probe.height))
    obj = draw(unit, _jitter(rng, COLOURS[item.colour]), _jitter(rng, COLOURS[item.second]), item.pattern, rng)
    obj = obj.rotate(float(rng.uniform(-15, 15)), Image.Resampling.BICUBIC, expand=True)
    if rng.random() < 0.5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    left = int(rng.uniform(0.02, 0.98) * max(1, canvas - obj.width))
    foot = int(rng.uniform(horizon + 0.08 * canvas, canvas - 0.03 * canvas))
    top = min(max(0, foot - obj.height), max(0, canvas - obj.height))
    shadow = Image.new("RGBA", scene.size, (0, 0, 0, 0))
    ImageDraw.Draw(shadow).ellipse((left + obj.width * 0.1, top + obj.height - canvas * 0.03,
                                    left + obj.width * 0.9, top + obj.height + canvas * 0.02), fill=(0, 0, 0, 90))
    scene = Image.alpha_composite(scene, shadow.filter(ImageFilter.GaussianBlur(canvas / 80)))
    scene.alpha_composite(obj, (left, top))
    pixels = np.asarray(scene.convert("RGB"), np.float32) * rng.uniform(0.85, 1.1)
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return photo.resize((size, size), Image.Resampling.LANCZOS), item
