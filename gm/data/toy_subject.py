"""The project's built-in DreamBooth subject: photos of one toy robot, drawn with PIL (no downloads).

The subject is always the same object: a robot whose body has red and yellow horizontal stripes, a
yellow head with two blue eyes and a grille mouth, a green-tipped antenna, grey arms with yellow
hands and navy legs. Each photo varies the scene (background kind and colours), the robot's
position, scale and tilt, and the light, drawn from ``(seed, index)`` so the set is reproducible.
Shapes are drawn at 4x and downsampled for smooth edges.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gm.errors import ConfigError

_logger = logging.getLogger(__name__)

# The DreamBooth paper's template, "a [V] [class]": in the toy world's text encoders "sks" alone in place of
# the article leaves the prompt at cosine 0.999 to the class prompt, which the prior then pulls back to the
# class; as an extra word before the class noun (where colours go) it reads 0.92 (README, quick start).
TOY_INSTANCE_PROMPT = "a photo of a sks toy"
TOY_CLASS_PROMPT = "a photo of a toy"
BACKGROUNDS = ("wooden table", "beach", "checkered tablecloth", "lawn", "grey studio backdrop")
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}
_SUPERSAMPLE = 4

# The subject's fixed palette: what makes it "this" toy.
_RED, _YELLOW, _BLUE = (206, 32, 41), (250, 196, 40), (30, 110, 215)
_GREEN, _GREY, _NAVY, _INK = (40, 160, 110), (120, 124, 130), (36, 44, 88), (25, 25, 30)

Color = Tuple[int, int, int]


# The robot's height as a share of the frame: the range the toy world draws its own robots at
# (gm.data.toy_world), so the base has learned toys of this size. Drawn at 0.42-0.7 (until the 22nd
# session), its 3-pixel stripes fell inside one 8x8 latent cell at 64x64 and even the 24000-step VAE
# returned an orange blob; at this size its round trip keeps the stripes.
SUBJECT_HEIGHT = (0.55, 0.85)


def _jitter(rng: np.random.Generator, color: Color, amount: int = 18) -> Color:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _vertical_gradient(size: int, top: Color, bottom: Color) -> Image.Image:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    rows = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return Image.fromarray(np.broadcast_to(rows, (size, size, 3)).round().astype(np.uint8), "RGB")


def _background(kind: str, size: int, horizon: int, rng: np.random.Generator) -> Image.Image:
    """A ``size`` square RGB scene whose floor starts at row ``horizon``."""
    if kind == "wooden table":
        image = _vertical_gradient(size, _jitter(rng, (215, 205, 185)), _jitter(rng, (190, 178, 160)))
        draw = ImageDraw.Draw(image)
        wood = _jitter(rng, (150, 95, 50))
        draw.rectangle((0, horizon, size, size), fill=wood)
        plank = max(2, size // 7)
        for y in range(horizon, size, plank):
            draw.line((0, y, size, y), fill=tuple(c - 40 for c in wood), width=max(1, size // 160))
            for _ in range(3):  # grain streaks
                x0 = int(rng.integers(0, size))
                yy = y + int(rng.integers(2, plank))
                draw.line((x0, yy, x0 + size // 4, yy), fill=tuple(c - 20 for c in wood), width=max(1, size // 256))
    elif kind == "beach":
        image = _vertical_gradient(size, _jitter(rng, (120, 180, 235)), _jitter(rng, (200, 230, 250)))
        draw = ImageDraw.Draw(image)
        sea_top = horizon - size // 10
        draw.rectangle((0, sea_top, size, horizon), fill=_jitter(rng, (40, 120, 170)))
        draw.rectangle((0, horizon, size, size), fill=_jitter(rng, (230, 205, 150)))
        sun = int(rng.integers(size // 8, size - size // 8))
        radius = size // 14
        draw.ellipse((sun - radius, size // 10, sun + radius, size // 10 + 2 * radius), fill=(255, 240, 180))
    elif kind == "checkered tablecloth":
        image = _vertical_gradient(size, _jitter(rng, (240, 230, 200)), _jitter(rng, (225, 210, 180)))
        draw = ImageDraw.Draw(image)
        cell = max(2, size // 10)
        check = _jitter(rng, (70, 110, 200), 25)  # blue checks: no red/yellow to confuse with the subject
        for row, y in enumerate(range(horizon, size, cell)):
            for col, x in enumerate(range(0, size, cell)):
                draw.rectangle((x, y, x + cell, y + cell), fill=check if (row + col) % 2 else (245, 245, 240))
    elif kind == "lawn":
        image = _vertical_gradient(size, _jitter(rng, (150, 200, 240)), _jitter(rng, (220, 235, 245)))
        draw = ImageDraw.Draw(image)
        grass = _jitter(rng, (70, 150, 60))
        draw.rectangle((0, horizon, size, size), fill=grass)
        for _ in range(size // 2):  # blades
            x, y = int(rng.integers(0, size)), int(rng.integers(horizon, size))
            draw.line((x, y, x + int(rng.integers(-3, 4)) * _SUPERSAMPLE, y - size // 40),
                      fill=tuple(c - 30 for c in grass), width=max(1, size // 200))
    else:  # grey studio backdrop
        grey = int(rng.integers(150, 215))
        image = _vertical_gradient(size, (grey + 30, grey + 30, grey + 32), (grey - 40, grey - 40, grey - 38))
    return image


def _robot(unit: int) -> Image.Image:
    """The subject on a transparent RGBA layer, ``10*unit`` wide and ``16*unit`` tall, feet at the bottom."""
    layer = Image.new("RGBA", (10 * unit, 16 * unit), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    line = max(1, unit // 6)
    u = unit
    # Antenna and its green ball.
    draw.line((5 * u, 0.9 * u, 5 * u, 2.2 * u), fill=_INK, width=line)
    draw.ellipse((4.4 * u, 0.2 * u, 5.6 * u, 1.4 * u), fill=_GREEN, outline=_INK, width=line)
    # Head: yellow with blue eyes and a grille mouth.
    draw.rounded_rectangle((2.8 * u, 2.0 * u, 7.2 * u, 5.2 * u), radius=0.6 * u, fill=_YELLOW, outline=_INK, width=line)
    for cx in (4.0 * u, 6.0 * u):
        draw.ellipse((cx - 0.6 * u, 2.8 * u, cx + 0.6 * u, 4.0 * u), fill=_BLUE, outline=_INK, width=line)
        draw.ellipse((cx - 0.3 * u, 3.0 * u, cx, 3.3 * u), fill=(255, 255, 255))
    for x in np.linspace(4.0 * u, 6.0 * u, 4):
        draw.line((x, 4.4 * u, x, 4.9 * u), fill=_INK, width=line)
    # Arms with yellow hands.
    for x0 in (0.9 * u, 7.9 * u):
        draw.rectangle((x0, 6.0 * u, x0 + 1.2 * u, 9.6 * u), fill=_GREY, outline=_INK, width=line)
        draw.ellipse((x0 - 0.1 * u, 9.3 * u, x0 + 1.3 * u, 10.7 * u), fill=_YELLOW, outline=_INK, width=line)
    # Legs and feet.
    for x0 in (3.3 * u, 5.5 * u):
        draw.rectangle((x0, 12.0 * u, x0 + 1.2 * u, 15.0 * u), fill=_NAVY, outline=_INK, width=line)
        draw.rounded_rectangle((x0 - 0.4 * u, 14.8 * u, x0 + 1.6 * u, 15.9 * u), radius=0.3 * u, fill=_INK)
    # Body: five red/yellow stripes in a black frame.
    top, bottom, stripes = 5.6 * u, 12.2 * u, 5
    step = (bottom - top) / stripes
    for i in range(stripes):
        draw.rectangle((2.2 * u, top + i * step, 7.8 * u, top + (i + 1) * step), fill=_RED if i % 2 == 0 else _YELLOW)
    draw.rectangle((2.2 * u, top, 7.8 * u, bottom), outline=_INK, width=line)
    return layer


def render_toy_photo(index: int, *, size: int = 128, seed: int = 0) -> Tuple[Image.Image, str]:
    """Photo ``index`` of the subject: RGB ``size`` x ``size`` and the background's name.

    Backgrounds cycle through :data:`BACKGROUNDS`; everything else is drawn from ``(seed, index)``.
    """
    rng = np.random.default_rng([seed, index])
    canvas = size * _SUPERSAMPLE
    kind = BACKGROUNDS[index % len(BACKGROUNDS)]
    horizon = int(canvas * rng.uniform(0.45, 0.62))
    scene = _background(kind, canvas, horizon, rng).convert("RGBA")

    height = int(canvas * rng.uniform(*SUBJECT_HEIGHT))
    robot = _robot(max(2, height // 16)).rotate(float(rng.uniform(-15, 15)), Image.Resampling.BICUBIC, expand=True)
    width = robot.width
    left = int(rng.uniform(0.02, 0.98) * max(1, canvas - width))
    foot = int(rng.uniform(horizon + 0.08 * canvas, canvas - 0.03 * canvas))
    top = min(max(0, foot - robot.height), canvas - robot.height)

    shadow = Image.new("RGBA", scene.size, (0, 0, 0, 0))
    ImageDraw.Draw(shadow).ellipse((left + width * 0.1, top + robot.height - canvas * 0.03,
                                    left + width * 0.9, top + robot.height + canvas * 0.02), fill=(0, 0, 0, 90))
    scene = Image.alpha_composite(scene, shadow.filter(ImageFilter.GaussianBlur(canvas / 80)))
    scene.alpha_composite(robot, (left, top))

    # Lighting: a global brightness change, then downsample for anti-aliased edges.
    pixels = np.asarray(scene.convert("RGB"), np.float32) * rng.uniform(0.85, 1.1)
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return photo.resize((size, size), Image.Resampling.LANCZOS), kind


def draw_toy_subject(out_dir: Union[str, Path], *, num_images: int = 5, size: int = 128, seed: int = 0,
                     image_format: str = "jpg", captions: bool = False,
                     prompt: str = TOY_INSTANCE_PROMPT) -> List[Path]:
    """Write ``num_images`` photos ``toy_00.<format>``, ... to ``out_dir``; returns their paths.

    With ``captions`` each photo gets a sidecar ``toy_00.txt``: ``"<prompt> on a <background>"``.
    Existing files of the same names are overwritten; others are left alone.
    """
    if num_images < 1:
        raise ConfigError(f"--num_images {num_images}: must be >= 1")
    if size < 32:
        raise ConfigError(f"--size {size}: must be >= 32 pixels")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"--format {image_format!r}: choose one of {sorted(IMAGE_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(num_images):
        photo, kind = render_toy_photo(index, size=size, seed=seed)
        path = out / f"toy_{index:02d}.{image_format}"
        options = {"quality": 95} if image_format == "jpg" else {}
        photo.save(path, IMAGE_FORMATS[image_format], **options)
        if captions:
            path.with_suffix(".txt").write_text(f"{prompt} on a {kind}\n", encoding="utf-8")
        paths.append(path)
    _logger.info("wrote %d %dx%d photos of the toy subject to %s", num_images, size, size, out)
    return paths
