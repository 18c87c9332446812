"""Images with LoRAs against diffusers (the reference): two LoRAs of ours (kohya file with UNet and
text-encoder modules, diffusers file with UNet attn/ff/proj), at scales 0.8 and 0.5, sampled by
``demo/sampling_without_streamlit.py --weight base,a,b --lora_scale 0.8 0.5`` give the image
``StableDiffusionXLPipeline`` gives after ``load_lora_weights`` + ``set_adapters`` from the same
tiny weights and starting latents, within 2/255; the base from ``tools/merge_lora.py`` with the
same LoRAs and scales gives that image too; a merge streams (peak memory far below the base's size).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gm.checkpoint.lora import save_lora
from gm.models.diffusion import build_engine
from gm.modules.lora import LoRAConfig, inject_lora, lora_parameters, set_lora_values

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a photo of sks dog on the beach"
SIZE, STEPS, GUIDANCE = 64, 4, 5.0
SCALES = (0.8, 0.5)


@pytest.fixture(scope="module")
def files(tiny_weights, tmp_path_factory):
    """Starting noise and two LoRA files with random factors (kohya and diffusers format)."""
    root = tmp_path_factory.mktemp("lora_images")
    np.save(root / "noise.npy", np.random.default_rng(11).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(
        np.float32))
    loras = []
    for seed, (name, config, fmt) in enumerate((
            ("a.safetensors", LoRAConfig(rank=4, alpha=8.0, unet_targets=("attn", "ff"), text_encoder=True), "kohya"),
            ("b.safetensors", LoRAConfig(rank=2, alpha=2.0, unet_targets=("attn", "ff", "proj")), "diffusers"))):
        engine = build_engine(tiny_weights.config)  # a LoRA file holds only the factors: no base needed
        inject_lora(engine, config)
        rng = np.random.default_rng(seed)
        set_lora_values(engine, {k: rng.standard_normal(p.shape).astype(np.float32) * 0.15
                                 for k, p in lora_parameters(engine).items()})
        save_lora(engine, root / name, lora_format=fmt)
        loras.append(root / name)
    return root, loras


def _sample(tiny_weights, root, weight, out, extra=()):
    cmd = [sys.executable, "demo/sampling_without_streamlit.py", "--config", str(tiny_weights.config),
           "--weight", weight, "--prompt", PROMPT, "--width", str(SIZE), "--height", str(SIZE),
           "--sample_step", str(STEPS), "--guidance_scale", str(GUIDANCE), "--init_latent_path",
           str(root / "noise.npy"), "--save_path", str(root / out), "--ms_mode", "1", *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    image = Image.open(root / out / "000000.png")
    return np.asarray(image).astype(int), image.text, result.stderr


def _reference(tiny_weights, root, loras):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_weights.diffusers_dir)
    for i, path in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=list(SCALES))
    pipe.scheduler.set_timesteps(STEPS)
    sigma_max = float(pipe.scheduler.sigmas[0])
    # SGM and we start from noise * sqrt(1 + sigma_max^2); the pipeline multiplies by sigma_max
    latents = torch.from_numpy(np.load(root / "noise.npy"))
    start = latents * (math.sqrt(1 + sigma_max**2) / sigma_max)
    with torch.no_grad():
        out = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=start, output_type="np").images
    return (out[0] * 255).round().astype(int)


def _max_diff(a, b):
    return int(np.abs(a - b).max())


def test_two_loras_with_scales_match_diffusers_and_the_merged_base(tiny_weights, files, tmp_path):
    root, loras = files
    base = str(tiny_weights.single_file)
    ours, meta, log = _sample(tiny_weights, root, ",".join([base, *map(str, loras)]), "ours",
                              ["--lora_scale", *map(str, SCALES)])
    assert meta["weights"] == f"{base},{loras[0]}:0.8,{loras[1]}:0.5"
    assert "(kohya format) at scale 0.8" in log and "(diffusers format) at scale 0.5" in log
    reference = _reference(tiny_weights, root, loras)
    assert ((reference > 0) & (reference < 255)).mean() > 0.5  # not saturated: a difference would show
    assert _max_diff(ours, reference) <= 2, f"max pixel difference {_max_diff(ours, reference)}/255"
    # the LoRAs matter: the base image is far from it
    plain, _, _ = _sample(tiny_weights, root, base, "plain")
    assert np.abs(plain - reference).mean() > 5

    merged = tmp_path / "merged.safetensors"
    result = subprocess.run([sys.executable, "tools/merge_lora.py", "--base", base, "--lora",
                             *(f"{p}:{s}" for p, s in zip(loras, SCALES)), "--output", str(merged),
                             "--config", str(tiny_weights.config)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from_merged, _, _ = _sample(tiny_weights, root, str(merged), "merged")
    assert _max_diff(from_merged, reference) <= 2, f"merged base: {_max_diff(from_merged, reference)}/255"


def test_merge_streams_the_base(tiny_weights, files, tmp_path):
    """A 1 GiB base (the tiny model + 64 filler tensors of 16 MiB): the merge's peak resident memory
    stays below 1.5x the file, and grows by far less than the file while merging."""
    from gm.checkpoint.safetensors_io import SafetensorsFile, write_safetensors_streaming

    _, loras = files
    tiny = SafetensorsFile(tiny_weights.single_file)
    filler = {f"filler.{i:02d}": (4096, 1024) for i in range(64)}
    entries = [(k, tiny.dtype(k), tiny.shape(k)) for k in tiny] + [(k, "F32", s) for k, s in filler.items()]
    base = tmp_path / "big_base.safetensors"
    write_safetensors_streaming(base, entries, lambda k: tiny[k] if k in tiny else np.full(filler[k], 0.5, np.float32))
    size = base.stat().st_size
    assert size > 2**30
    # VmHWM (peak resident memory of this process image; ru_maxrss would also count the forking
    # pytest process, which Linux carries across exec)
    probe = (
        "import re, runpy, sys\n"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        f"sys.argv = ['tools/merge_lora.py', '--base', {str(base)!r}, '--lora', {str(loras[0])!r},"
        f" '--output', {str(tmp_path / 'merged.safetensors')!r}, '--config', {str(tiny_weights.config)!r}]\n"
        "import gm.checkpoint.lora_merge, gm.models.diffusion\n"  # the imports' memory is not the merge's
        "before = hwm()\n"
        "runpy.run_path('tools/merge_lora.py', run_name='__main__')\n"
        "print('RSS_KB', before, hwm())\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-2000:]
    before, peak = (int(v) * 1024 for v in result.stdout.split("RSS_KB")[1].split())
    assert list(SafetensorsFile(tmp_path / "merged.safetensors")) == [name for name, _, _ in entries]
    print(f"merge of a {size / 2**30:.2f} GiB base: peak RSS {peak / 2**30:.2f} GiB, "
          f"{(peak - before) / 2**20:.0f} MiB of it while merging")
    assert peak < 1.5 * size, f"peak RSS {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB base"
    assert peak - before < 0.25 * size, f"the merge added {(peak - before) / 2**20:.0f} MiB"
