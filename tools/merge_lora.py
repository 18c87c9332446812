"""Bake one or more LoRAs into SDXL base weights and write an official single .safetensors.

    python tools/merge_lora.py --base sd_xl_base_1.0.safetensors --lora sks_dog.safetensors \
        --output sd_xl_sks_dog.safetensors
    python tools/merge_lora.py --base sd_xl_base_1.0.safetensors --lora a.safetensors:0.8 b.safetensors:0.5 \
        --output merged.safetensors --dtype fp16

Each --lora is FILE or FILE:SCALE (default scale 1), in any format (kohya, diffusers, the seed's
ckpt, ours). The base is streamed tensor by tensor: memory stays near one tensor, not the file.
The result loads anywhere an SDXL base does (``--weight merged.safetensors``, ComfyUI, diffusers'
``from_single_file``); ``tools/convert_weights.py`` makes a MindSpore .ckpt of it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gm.checkpoint.lora_merge import merge_into_single_file, parse_lora_spec  # noqa: E402
from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.errors import ConfigError  # noqa: E402
from gm.fs import check_output_file  # noqa: E402
from gm.models.diffusion import build_engine  # noqa: E402

_logger = logging.getLogger("gm.merge_lora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="official single .safetensors (e.g. sd_xl_base_1.0.safetensors)")
    parser.add_argument("--lora", required=True, nargs="+", type=parse_lora_spec, help="FILE or FILE:SCALE, any format")
    parser.add_argument("--output", required=True, help="output .safetensors")
    parser.add_argument("--config", default=str(REPO / "configs" / "inference" / "sd_xl_base.yaml"),
                        help="model config of the base (default: SDXL base)")
    parser.add_argument("--dtype", choices=["keep", "fp32", "fp16", "bf16"], default="keep",
                        help="floating tensors of the output (keep: the base's)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    check_output_file(args.output, args.overwrite)
    for path, _ in args.lora:
        if not Path(path).is_file():
            raise ConfigError(f"--lora {path}: no such file")
    engine = build_engine(args.config, allocate=False)
    merge_into_single_file(engine, args.base, args.lora, args.output, args.dtype)


if __name__ == "__main__":
    run_cli(main)
