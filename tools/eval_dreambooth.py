"""The DreamBooth paper's metrics of generated images: DINO, CLIP-I (subject fidelity against the
real subject photos) and CLIP-T (prompt fidelity), per prompt and overall; or the reference
repo's CLIP score.

    python tools/eval_dreambooth.py --images outputs/dog_eval --subject dog/ \\
        --clip clip-vit-large-patch14/ --dino dino-vits16/ --json metrics.json
    python tools/eval_dreambooth.py --images outputs/dog_eval --subject dog/ --clip clip-vit-large-patch14/ \\
        --prompts prompts_and_classes.txt --unique_token sks --class_token dog
    python tools/eval_dreambooth.py --images outputs/samples --clip clip-vit-large-patch14/ --metric clip_score

Each generated image's prompt is its PNG "prompt" text (what this project's sampler writes), else
its sidecar ``<image>.txt``, else it comes from --prompts: the images in name order, an equal
number per prompt, in the file's order (the paper's file is formatted with --unique_token and
--class_token; a plain file holds one prompt per line). --clip and --dino take a transformers model
folder or its bare .safetensors file (see gm/metrics/encoders.py); no torch is needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.errors import ConfigError  # noqa: E402

_logger = logging.getLogger("gm.eval_dreambooth")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--subject", help="folder of the real subject photos (DINO, CLIP-I)")
    parser.add_argument("--prompts", help="prompt file (the paper's prompts_and_classes.txt or one per line)")
    parser.add_argument("--unique_token", default="sks")
    parser.add_argument("--class_token", help="the subject's class in --prompts (default: from the file's table "
                                              "by the --subject folder's name)")
    parser.add_argument("--clip", help="CLIP model folder or .safetensors (CLIP-I, CLIP-T, CLIP score)")
    parser.add_argument("--dino", help="DINO ViT model folder or .safetensors (DINO)")
    parser.add_argument("--metric", default="dreambooth", choices=["dreambooth", "clip_score"])
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    return parser.parse_args(argv)


def image_prompts(paths: List[Path], prompts: Optional[List[str]], flag_images: str) -> List[str]:
    """Each image's prompt: PNG text, sidecar .txt, else --prompts in blocks (see the module docstring)."""
    from PIL import Image

    from gm.data.dreambooth import read_caption

    found: List[Optional[str]] = []
    for path in paths:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("prompt") if path.suffix.lower() == ".png" else None
        found.append(text or read_caption(path, "") or None)
    if all(found):
        return [str(p) for p in found]
    if not prompts:
        missing = next(p for p, f in zip(paths, found) if not f)
        raise ConfigError(f"--images {flag_images}: {missing.name} has no prompt (no PNG 'prompt' text, no sidecar "
                          ".txt); give --prompts FILE")
    if len(paths) % len(prompts):
        raise ConfigError(f"--images {flag_images}: {len(paths)} images do not split evenly over the "
                          f"{len(prompts)} prompts of --prompts")
    per = len(paths) // len(prompts)
    return [prompts[i // per] for i in range(len(paths))]


def format_table(result: dict) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"{'prompt':<60} {'n':>3} {'DINO':>7} {'CLIP-I':>7} {'CLIP-T':>7}"]
    for row in result["per_prompt"]:
        lines.append(f"{row['prompt'][:60]:<60} {row['images']:>3} {cell(row['dino']):>7} {cell(row['clip_i']):>7} "
                     f"{cell(row['clip_t']):>7}")
    lines.append(f"{'overall':<60} {result['images']:>3} {cell(result['dino']):>7} {cell(result['clip_i']):>7} "
                 f"{cell(result['clip_t']):>7}")
    return "\n".join(lines)


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    from PIL import Image

    from gm.data.dreambooth import validate_image_folder
    from gm.inference import set_mode
    from gm.metrics.dreambooth import clip_score, dreambooth_metrics, read_prompt_file

    if args.metric == "clip_score" and not args.clip:
        raise ConfigError("--metric clip_score needs --clip (a CLIP model folder or .safetensors)")
    if args.metric == "dreambooth":
        if not (args.clip or args.dino):
            raise ConfigError("give --clip and/or --dino: the models the metrics are computed with")
        if not args.subject:
            raise ConfigError("--subject is required: the folder of real subject photos DINO and CLIP-I compare with")
    for flag in ("clip", "dino"):
        value = getattr(args, flag)
        if value and not Path(value).exists():
            raise ConfigError(f"--{flag} {value}: no such file or folder")
    paths = validate_image_folder(args.images, "--images")
    real_paths = validate_image_folder(args.subject, "--subject") if args.subject else []
    template_prompts = None
    if args.prompts:
        prompt_file = read_prompt_file(args.prompts)
        class_token = args.class_token or (prompt_file.classes.get(Path(args.subject).name) if args.subject else None)
        if prompt_file.live_prompts or prompt_file.classes:
            if not class_token:
                raise ConfigError(f"--prompts {args.prompts}: give --class_token (the --subject folder's name is not "
                                  "in the file's table)")
        template_prompts = prompt_file.prompts(args.unique_token, class_token or "")
    prompts = image_prompts(paths, template_prompts, args.images)

    set_mode(1, args.device_target)
    images = [Image.open(p).convert("RGB") for p in paths]
    real = [Image.open(p) for p in real_paths]
    clip = dino = None
    if args.clip:
        from gm.metrics.encoders import ClipEvaluator

        clip = ClipEvaluator(args.clip)
    if args.dino and args.metric == "dreambooth":
        from gm.metrics.encoders import DinoEvaluator

        dino = DinoEvaluator(args.dino)
    clip_images = clip.image_embeds(images) if clip else None
    clip_text = clip.text_embeds(prompts) if clip else None
    if args.metric == "clip_score":
        result = {"clip_score": clip_score(clip_images, clip_text), "images": len(images)}
        print(f"CLIP score over {len(images)} images: {result['clip_score']:.4f}")
    else:
        result = dreambooth_metrics(prompts, dino.image_embeds(images) if dino else None,
                                    dino.image_embeds(real) if dino else None, clip_images,
                                    clip.image_embeds(real) if clip else None, clip_text)
        print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        _logger.info("wrote %s", args.json)


if __name__ == "__main__":
    run_cli(main)
