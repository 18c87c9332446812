"""Sampling speed, ours (MindSpore, graph mode) against diffusers (torch), measured in one run.

    python benchmarks/sampling_speed.py                      # tiny and medium configs, CPU
    python benchmarks/sampling_speed.py --configs configs/inference/sd_xl_medium.yaml --size 256

Both sides get the same random weights (ours loaded from the reference's diffusers folder), the
same prompt, guidance, sampler (Euler, "trailing" steps) and starting latents. Compile/warm-up
runs are excluded. Seconds per step come from the difference between two step counts, so text
encoding and VAE decoding (included in seconds per image) cancel out. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import reference  # noqa: E402  (the test suite's reference builders)
import torch  # noqa: E402

from gm.checkpoint.load import load_weights  # noqa: E402
from gm.inference import Sampler, SamplingOptions  # noqa: E402
from gm.models.diffusion import build_engine  # noqa: E402
from gm.modules.embedders.tokenizer import EOT_TOKEN, OPEN_CLIP_PAD_TOKEN, build_hf_tokenizer  # noqa: E402

PROMPT = "a photo of sks dog on the beach"


def reference_pipeline(config: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing")
    return StableDiffusionXLPipeline(
        vae=reference.build_vae(config), text_encoder=reference.build_clip_l(config),
        text_encoder_2=reference.build_open_clip_g(config), tokenizer=build_hf_tokenizer(EOT_TOKEN),
        tokenizer_2=build_hf_tokenizer(OPEN_CLIP_PAD_TOKEN), unet=reference.build_unet(config), scheduler=scheduler)


def timed(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_config(config: Path, size: int, steps: tuple, repeats: int) -> dict:
    pipe = reference_pipeline(config)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        engine = build_engine(config)
        load_weights(engine, tmp)
    sampler = Sampler(engine)
    noise = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)

    def ours(n):
        options = SamplingOptions(num_steps=n, height=size, width=size, guidance_scale=5.0)
        return lambda: sampler([PROMPT], options, noise=noise)

    def theirs(n):
        latents = torch.from_numpy(noise)
        return lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=n, guidance_scale=5.0,
                            latents=latents, output_type="np")

    ours(steps[0])()  # compile
    with torch.no_grad():
        theirs(steps[0])()  # warm-up
        result = {}
        for name, make in (("ours", ours), ("diffusers", theirs)):
            short, long = timed(make(steps[0]), repeats), timed(make(steps[1]), repeats)
            result[name] = {"s_per_image": long, "s_per_step": (long - short) / (steps[1] - steps[0])}
    result["ratio_s_per_step"] = result["ours"]["s_per_step"] / result["diffusers"]["s_per_step"]
    result["ratio_s_per_image"] = result["ours"]["s_per_image"] / result["diffusers"]["s_per_image"]
    result["config_sha1"] = hashlib.sha1(config.read_bytes()).hexdigest()[:12]
    result.update(size=size, steps=steps[1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=[str(reference.TINY_CONFIG),
                                                         str(REPO / "configs" / "inference" / "sd_xl_medium.yaml")])
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    parser.add_argument("--steps", type=int, nargs=2, default=(2, 6), help="two step counts (per-step = difference)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device_target", default="CPU")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target=args.device_target)
    torch.set_num_threads(torch.get_num_threads())
    report = {"device": f"{args.device_target} ({platform.processor() or platform.machine()})",
              "mindspore": ms.__version__, "torch": torch.__version__, "results": {}}
    for config in args.configs:
        report["results"][Path(config).stem] = bench_config(Path(config), args.size, tuple(args.steps), args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
