"""``--gradient_checkpointing`` (recompute ResBlock and transformer-block activations in backward)
changes memory, not math: the LoRA gradients equal the plain step's (graph mode). In PyNative,
MindSpore 2.10's recompute returns all-zero gradients (measured), so the script refuses the flag
there."""

from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from omegaconf import OmegaConf
from tiny_training import ValueAndGrads, make_batch, to_tensors

from gm.checkpoint.load import load_weights
from gm.models.diffusion import build_engine
from gm.modules.diffusionmodules.loss import DreamBoothLoss
from gm.modules.lora import LoRAConfig, inject_lora, lora_state, mark_only_lora_trainable, set_lora_values
from gm.train_config import load_training_config

REPO = Path(__file__).resolve().parents[2]
LORA = LoRAConfig(rank=4, alpha=4, unet_targets=("attn", "ff"))


def _engine(tiny_weights, checkpointing: bool):
    config = OmegaConf.load(tiny_weights.config)
    config.model.params.network_config.params.use_checkpoint = checkpointing
    engine = build_engine(config)
    load_weights(engine, tiny_weights.single_file)
    inject_lora(engine, LORA)
    mark_only_lora_trainable(engine)
    return engine


@pytest.fixture
def graph_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


def test_checkpointed_gradients_equal_plain_gradients(tiny_weights, graph_mode):
    plain, recomputed = _engine(tiny_weights, False), _engine(tiny_weights, True)
    rng = np.random.default_rng(0)
    # B random, so that every LoRA weight gets a gradient (B = 0 zeroes the A gradients)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in lora_state(plain).items()}
    set_lora_values(plain, state)
    set_lora_values(recomputed, state)
    batch = to_tensors(make_batch(np.random.default_rng(1), 4, plain))
    grads = []
    for engine in (plain, recomputed):
        loss = DreamBoothLoss(engine, with_prior_preservation=True)
        weights = [p for p in engine.get_parameters() if p.requires_grad]
        _, g = ValueAndGrads(loss, weights, has_aux=True)(*batch)
        grads.append([x.asnumpy() for x in g])
    # 17 transformer blocks: attn (2 attentions x 4 projections) + ff (2 linears), A and B each
    assert len(grads[0]) == len(grads[1]) == 2 * 17 * (8 + 2)
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_flag_turns_on_recompute_for_every_block():
    for flag in (False, True):
        cfg = load_training_config(REPO / "configs/training/sd_xl_tiny_dreambooth_lora.yaml",
                                   {"gradient_checkpointing": flag})
        assert bool(cfg.model.params.network_config.params.get("use_checkpoint", False)) is flag
        engine = build_engine(cfg.model, allocate=False)
        blocks = [c for _, c in engine.cells_and_names() if type(c).__name__ in ("ResBlock", "BasicTransformerBlock")]
        assert len(blocks) == 17 + 17  # tiny UNet: 17 ResBlocks (6 down, 2 middle, 9 up), 17 transformer blocks
        assert [bool(c._has_config_recompute) for c in blocks] == [flag] * len(blocks)


def test_pynative_with_checkpointing_is_refused(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "train_dreambooth.py", "--instance_data_path", str(tmp_path),
                             "--instance_prompt", "a photo of sks dog", "--gradient_checkpointing", "True",
                             "--ms_mode", "1", "--save_path", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--gradient_checkpointing" in last and "--ms_mode 0" in last and "Traceback" not in result.stderr
