"""Draw the built-in DreamBooth subject (a striped toy robot) into a folder; no downloads.

    python tools/draw_toy_subject.py --out outputs/toy_subject --num_images 5 --size 128 --seed 0

Train on it with ``--instance_data_path outputs/toy_subject --instance_prompt "a photo of a sks toy"``
(class prompt: "a photo of a toy"). The same seed always draws the same photos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.data.toy_subject import IMAGE_FORMATS, TOY_INSTANCE_PROMPT, draw_toy_subject  # noqa: E402
from gm.errors import ConfigError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/toy_subject", help="folder to write the photos into")
    parser.add_argument("--num_images", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="jpg", choices=sorted(IMAGE_FORMATS))
    parser.add_argument("--captions", action="store_true",
                        help="also write <name>.txt sidecars: '<--prompt> on a <background>'")
    parser.add_argument("--prompt", default=TOY_INSTANCE_PROMPT, help="caption prefix used with --captions")
    parser.add_argument("--overwrite", action="store_true", help="replace toy_NN files already in --out")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    if args.num_images < 1 or args.size < 8:
        raise ConfigError(f"--num_images {args.num_images} --size {args.size}: need at least 1 image of 8 pixels")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder")
    names = [f"toy_{i:02d}.{args.format}" for i in range(args.num_images)]
    names += [f"toy_{i:02d}.txt" for i in range(args.num_images)] if args.captions else []
    taken = [name for name in names if (out / name).exists()]
    if taken and not args.overwrite:
        raise ConfigError(f"--out {out}: {taken[0]} (and {len(taken) - 1} more) already there; choose another "
                          "folder or pass --overwrite")
    draw_toy_subject(args.out, num_images=args.num_images, size=args.size, seed=args.seed,
                     image_format=args.format, captions=args.captions, prompt=args.prompt)


if __name__ == "__main__":
    run_cli(main)
