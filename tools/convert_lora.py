"""Convert a LoRA file between formats: kohya (ComfyUI, A1111/Forge, diffusers), diffusers/PEFT,
the seed's MindSpore ``*_lora.ckpt`` and ours. The input format is detected from its keys.

    python tools/convert_lora.py --input sks_lora.safetensors --to diffusers --output pytorch_lora_weights.safetensors
    python tools/convert_lora.py --input pytorch_lora_weights.safetensors --to kohya --output sks_kohya.safetensors
    python tools/convert_lora.py --input sks_kohya.safetensors --to seed --output sks_lora.ckpt

Module names come from the model built from --config (without allocating it): every key is
checked against it and a key that matches no module stops the conversion with its name.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gm.checkpoint.lora_formats import FORMATS, convert_lora_file  # noqa: E402
from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.fs import check_output_file  # noqa: E402
from gm.models.diffusion import build_engine  # noqa: E402

_logger = logging.getLogger("gm.convert_lora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a LoRA file in any supported format")
    parser.add_argument("--output", required=True, help=".safetensors (kohya, diffusers, gm) or .ckpt (seed, gm)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--config", default=str(REPO / "configs" / "inference" / "sd_xl_base.yaml"),
                        help="model config the LoRA belongs to (default: SDXL base)")
    parser.add_argument("--dtype", choices=["keep", "fp32", "fp16", "bf16"], default="keep",
                        help="cast the factors (bf16: rounded to nearest even)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    check_output_file(args.output, args.overwrite)
    engine = build_engine(args.config, allocate=False)
    report = convert_lora_file(engine, args.input, args.output, args.to, args.dtype)
    _logger.info("converted %d LoRA modules from %s to %s format: %s", report["modules"], report["from"],
                 report["to"], args.output)


if __name__ == "__main__":
    run_cli(main)
