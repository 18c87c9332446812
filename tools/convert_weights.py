"""Convert SDXL base weights between the official single file, diffusers folders and MindSpore .ckpt.

    python tools/convert_weights.py --input sd_xl_base_1.0.safetensors --output sd_xl_base_1.0_ms.ckpt
    python tools/convert_weights.py --input stable-diffusion-xl-base-1.0/ --output sdxl_base.safetensors
    python tools/convert_weights.py --input sdxl_base_ms.ckpt --output sdxl_base.safetensors --dtype fp16
    # the reference's (mindone) sd_xl_base_1.0_ms.ckpt, both ways (it is also read directly)
    python tools/convert_weights.py --input sd_xl_base_1.0.safetensors --output sd_xl_base_1.0_ms.ckpt --names reference
    python tools/convert_weights.py --input sd_xl_base_1.0_ms.ckpt --output sd_xl_base_1.0.safetensors

Every key and shape is checked against the model built from --config (without allocating it)
before anything is written; the output uses the official single-file key names, or with
``--names reference`` (a .ckpt) the names the reference's converter writes.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gm.checkpoint.errors import CheckpointError  # noqa: E402
from gm.checkpoint.load import declared_prediction_type, open_weight_file, weight_arrays  # noqa: E402
from gm.checkpoint.prediction_type import marker_arrays, marker_metadata  # noqa: E402
from gm.checkpoint.reference_names import reference_names  # noqa: E402
from gm.checkpoint.save import save_weights  # noqa: E402
from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.fs import check_output_file  # noqa: E402
from gm.models.diffusion import build_engine  # noqa: E402

_logger = logging.getLogger("gm.convert_weights")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="official .safetensors, diffusers folder, or .ckpt")
    parser.add_argument("--output", required=True, help="output .ckpt (MindSpore) or .safetensors (official names)")
    parser.add_argument("--config", default=str(REPO / "configs" / "inference" / "sd_xl_base.yaml"),
                        help="model config the weights belong to (default: SDXL base)")
    parser.add_argument("--dtype", choices=["keep", "fp32", "fp16"], default="keep",
                        help="cast floating tensors (bf16 sources are read as fp32)")
    parser.add_argument("--names", choices=["official", "reference"], default="official",
                        help="reference: the MindSpore names of the reference's sd_xl_base_1.0_ms.ckpt (.ckpt only)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    check_output_file(args.output, args.overwrite)
    output = Path(args.output)
    if output.exists() and output.resolve() == Path(args.input).resolve():
        raise CheckpointError(f"--output {output} is the input; choose another name")
    if args.names == "reference" and output.suffix != ".ckpt":
        raise CheckpointError(f"--names reference writes a MindSpore .ckpt; give an --output ending in .ckpt, not "
                              f"{output.name}")
    engine = build_engine(args.config, allocate=False)
    source = None if Path(args.input).is_dir() else open_weight_file(engine, args.input)
    # a v-prediction model stays one: its declaration (a diffusers scheduler config, a v_pred key)
    # becomes the output's v_pred key and ModelSpec entry
    declared = declared_prediction_type(args.input, source)
    arrays = itertools.chain(weight_arrays(engine, args.input, source), marker_arrays(declared or "epsilon").items())
    if args.names == "reference":
        names = reference_names(engine)
        arrays = ((names.get(name, name), value) for name, value in arrays)
    count = save_weights(arrays, output, args.dtype, metadata={
        "converted_from": Path(args.input).name, **(marker_metadata(declared) if declared else {})})
    _logger.info("wrote %d tensors to %s", count, output)


if __name__ == "__main__":
    run_cli(main)
