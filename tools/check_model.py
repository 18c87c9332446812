"""Build SDXL from a config, load weights, report parameter counts and time one forward pass.

    python tools/check_model.py --config configs/inference/sd_xl_base.yaml --weight sd_xl_base_1.0.safetensors
    python tools/check_model.py --config configs/inference/sd_xl_tiny.yaml

Without --weight the model keeps its random initial weights. The forward pass is one
conditioning + denoising + decoding at --resolution.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from gm.checkpoint.load import COMPONENTS, component_cell, load_weights, parameters_of  # noqa: E402
from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.errors import ConfigError  # noqa: E402
from gm.inference import set_mode  # noqa: E402
from gm.models.diffusion import build_engine  # noqa: E402

_logger = logging.getLogger("gm.check_model")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "inference" / "sd_xl_tiny.yaml"))
    parser.add_argument("--weight", default=None, help="official .safetensors, diffusers folder or .ckpt")
    parser.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    parser.add_argument("--ms_mode", type=int, default=1, choices=[0, 1], help="0: graph mode, 1: PyNative")
    parser.add_argument("--resolution", type=int, default=64, help="image size for the forward pass")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    import mindspore as ms

    if args.resolution < 8 or args.resolution % 8:
        raise ConfigError(f"--resolution {args.resolution}: must be a positive multiple of 8")
    set_mode(args.ms_mode, args.device_target)
    engine = build_engine(args.config)
    if args.weight:
        load_weights(engine, args.weight)
    for name in COMPONENTS:
        params = parameters_of(component_cell(engine, name))
        _logger.info("%-15s %13s parameters in %4d tensors", name,
                     f"{sum(int(np.prod(p.shape)) for p in params.values()):,}", len(params))

    size = args.resolution
    batch = {"txt": ["a photo of sks dog"], "original_size_as_tuple": np.array([[size, size]]),
             "crop_coords_top_left": np.array([[0, 0]]), "target_size_as_tuple": np.array([[size, size]])}
    start = time.perf_counter()
    cond = engine.get_conditioning(batch)
    latents = ms.Tensor(np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)), ms.float32)
    sigma = ms.Tensor(np.array([float(engine.denoiser.sigmas_np[-1])]), ms.float32)
    denoised = engine.denoise(latents, sigma, cond["crossattn"], cond["vector"])
    image = engine.decode_first_stage(denoised)
    _logger.info("forward: crossattn %s, vector %s, image %s in %.1f s", tuple(cond["crossattn"].shape),
                 tuple(cond["vector"].shape), tuple(image.shape), time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(main)
