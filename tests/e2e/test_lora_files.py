"""``demo/sampling_without_streamlit.py --weight base,lora``: a step-0 LoRA (lora_up zero) gives the
base image exactly, a LoRA with nonzero lora_up (UNet and text encoders) changes it; bad
``--weight`` lists fail with one line."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gm.checkpoint.lora import save_lora
from gm.errors import ConfigError
from gm.models.diffusion import build_engine
from gm.modules.lora import LoRAConfig, inject_lora, lora_parameters, set_lora_values

SIZE, STEPS = 64, 2
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tiny_weights, tmp_path_factory):
    """Starting noise, a step-0 LoRA (.ckpt) and a LoRA with nonzero lora_up (.safetensors)."""
    root = tmp_path_factory.mktemp("lora_cli")
    np.save(root / "noise.npy", np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(
        np.float32))
    engine = build_engine(tiny_weights.config)  # a LoRA file holds only the LoRA factors: no base needed
    inject_lora(engine, LoRAConfig(rank=4, unet_targets=("attn", "ff"), text_encoder=True))
    save_lora(engine, root / "step0_lora.ckpt", {"step": 0})
    rng = np.random.default_rng(0)
    set_lora_values(engine, {name: rng.standard_normal(p.shape).astype(np.float32) * 0.3
                             for name, p in lora_parameters(engine).items() if ".lora_up." in name})
    save_lora(engine, root / "trained_lora.safetensors", {"step": 100})
    return root


def _sample(tiny_weights, files, weight, name):
    out = files / name
    cmd = [sys.executable, "demo/sampling_without_streamlit.py", "--config", str(tiny_weights.config),
           "--weight", weight, "--prompt", "a photo of sks dog", "--width", str(SIZE), "--height", str(SIZE),
           "--sample_step", str(STEPS), "--init_latent_path", str(files / "noise.npy"), "--save_path", str(out)]
    # MindSpore's on-disk compile cache: the three runs compile the same graphs (a merged LoRA
    # model has the base structure), so only the first one pays for compilation
    env = dict(os.environ, MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(files / "compile_cache"))
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    image = Image.open(out / "000000.png")
    return np.asarray(image).astype(int), image.text


def test_lora_weight_changes_the_image_only_when_trained(tiny_weights, files):
    base, _ = _sample(tiny_weights, files, str(tiny_weights.single_file), "base")
    assert ((base > 0) & (base < 255)).mean() > 0.5  # not saturated: a difference would show
    step0_weight = f"{tiny_weights.single_file},{files / 'step0_lora.ckpt'}"
    step0, meta = _sample(tiny_weights, files, step0_weight, "step0")
    np.testing.assert_array_equal(step0, base)
    assert meta["weights"] == step0_weight
    trained, _ = _sample(tiny_weights, files, f"{tiny_weights.single_file},{files / 'trained_lora.safetensors'}",
                         "trained")
    assert np.abs(trained - base).mean() > 5


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("sampling_cli", REPO / "demo" / "sampling_without_streamlit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags,message", [
    (["--weight", "a.safetensors,"], "--weight a.safetensors,: an empty entry"),
    (["--weight", "a.safetensors,missing_lora.safetensors"], "LoRA file missing_lora.safetensors does not exist"),
    (["--weight", "a.safetensors,b.safetensors,c.safetensors", "--lora_scale", "0.5"],
     "--lora_scale: 1 scale.s. for 2 LoRA file.s. in --weight"),
    (["--weight", "a.safetensors", "--lora_scale", "0.5"], "--lora_scale: 1 scale.s. for 0 LoRA"),
    (["--weight", "a.safetensors,b.safetensors", "--lora_scale", "nan"], "--lora_scale nan: scales must be finite"),
])
def test_bad_weight_lists_are_rejected_before_building(cli, flags, message, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "setup_logging", lambda: None)  # keep pytest's logging set-up
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"not checked before the scales")
    with pytest.raises(ConfigError, match=message):
        cli.main([*flags, "--save_path", str(tmp_path / "out"), "--width", "64", "--height", "64"])
    assert not (tmp_path / "out").exists()
