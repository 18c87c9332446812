"""``--pynative_jit`` mechanics (gm.modules.pynative_jit) on the tiny UNet: a level whose structure
changed after it was compiled (a LoRA injected) compiles anew instead of reusing MindSpore's graph
of the old structure, and graph mode ignores the switch. Its numbers against the reference:
tests/parity/test_unet_parity.py."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from omegaconf import OmegaConf

from gm.models.diffusion import build_engine
from gm.modules.lora import LoRAConfig, inject_lora, lora_state, set_lora_values
from gm.modules.pynative_jit import compile_in_pynative, run_eagerly

TINY = "configs/inference/sd_xl_tiny.yaml"


@pytest.fixture(scope="module")
def engine_and_inputs():
    engine = build_engine(OmegaConf.load(TINY).model)
    unet = engine.model.diffusion_model
    unet.set_train(False)
    rng = np.random.default_rng(0)
    for param in unet.get_parameters():  # the zero-initialised output layers too: every path counts
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.05))
    p = OmegaConf.load(TINY).model.params.network_config.params
    inputs = [Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32)), Tensor(np.array([999, 250], np.float32)),
              Tensor(rng.standard_normal((2, 77, p.context_dim)).astype(np.float32)),
              Tensor(rng.standard_normal((2, p.adm_in_channels)).astype(np.float32))]
    return engine, inputs


def test_a_level_changed_after_compiling_compiles_anew_and_graph_mode_ignores_the_switch(engine_and_inputs):
    engine, inputs = engine_and_inputs
    unet = engine.model.diffusion_model
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        eager_base = unet(*inputs).asnumpy()
        assert compile_in_pynative(unet) == 19  # the tiny UNet's levels
        np.testing.assert_allclose(unet(*inputs).asnumpy(), eager_base, rtol=1e-5, atol=1e-6)
        inject_lora(engine, LoRAConfig(rank=4, alpha=4, unet_targets=("attn",)))
        rng = np.random.default_rng(1)
        set_lora_values(engine, {k: rng.standard_normal(v.shape).astype(np.float32)
                                 for k, v in lora_state(engine).items()})
        compiled = unet(*inputs).asnumpy()
        # MindSpore alone would hand back the graph compiled without the LoRA (measured), equal to
        # the base's output to float rounding (~1e-7 here)
        assert np.abs(compiled - eager_base).max() > 1e-3 * np.abs(eager_base).max()
        run_eagerly(unet)
        np.testing.assert_allclose(compiled, unet(*inputs).asnumpy(), rtol=1e-5, atol=1e-6)
        compile_in_pynative(unet)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    # graph mode parses construct and never takes the PyNative path
    np.testing.assert_allclose(unet(*inputs).asnumpy(), compiled, rtol=1e-4, atol=1e-5)


def test_shared_block_graphs_give_the_eager_loss_and_lora_gradients_on_every_call():
    """``--pynative_jit shared``: blocks of one structure run one compiled forward and backward,
    fed each block's weights; a frozen base with a LoRA gets eager PyNative's loss and LoRA
    gradients, on the second call too (where MindSpore's own differentiation of a shared graph
    returned zeros, measured)."""
    engine = build_engine(OmegaConf.load(TINY).model)
    unet = engine.model.diffusion_model
    unet.set_train(False)
    rng = np.random.default_rng(2)
    for param in unet.get_parameters():
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.05))
        param.requires_grad = False
    inject_lora(engine, LoRAConfig(rank=4, alpha=4, unet_targets=("attn",)))
    set_lora_values(engine, {k: rng.standard_normal(v.shape).astype(np.float32) * 0.1
                             for k, v in lora_state(engine).items()})
    lora = unet.trainable_params()
    p = OmegaConf.load(TINY).model.params.network_config.params
    inputs = [Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32)), Tensor(np.array([999, 250], np.float32)),
              Tensor(rng.standard_normal((2, 77, p.context_dim)).astype(np.float32)),
              Tensor(rng.standard_normal((2, p.adm_in_channels)).astype(np.float32))]
    weights = Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32))

    def loss_fn(x):
        return (unet(x, *inputs[1:]) * weights).sum()

    grad_fn = ms.value_and_grad(loss_fn, 0, lora)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        eager_loss, (eager_dx, eager_dlora) = grad_fn(inputs[0])
        blocks = compile_in_pynative(unet, shared=True)
        assert blocks == 34  # the tiny UNet's ResBlocks and transformer blocks
        for _ in range(2):
            loss, (dx, dlora) = grad_fn(inputs[0])
            np.testing.assert_allclose(loss.asnumpy(), eager_loss.asnumpy(), rtol=1e-5)
            np.testing.assert_allclose(dx.asnumpy(), eager_dx.asnumpy(), rtol=1e-4, atol=1e-6)
            # float rounding against each tensor's and the whole gradient's scale: deep in this
            # random UNet some LoRA gradients are ~1e-9 where others are ~1e-2
            overall = max(float(np.abs(g.asnumpy()).max()) for g in eager_dlora)
            for ours, eager in zip(dlora, eager_dlora):
                scale = np.abs(eager.asnumpy()).max()
                assert scale > 0 and np.abs(ours.asnumpy() - eager.asnumpy()).max() <= 1e-3 * scale + 1e-6 * overall
        switched = next(c for _, c in unet.cells_and_names() if "_pynative_graph" in c.__dict__)
        templates = switched._pynative_graph.templates
        assert len(templates) < blocks  # repeated structures share their graphs
        # a template copies one block, not the templates made before it (which its block's call holds)
        assert all("_pynative_graph" not in call.template.block.__dict__ for call in templates.values())
        assert sum(len(call.template.weights) for call in templates.values()) < len(list(unet.get_parameters()))
        run_eagerly(unet)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def test_shared_block_graphs_refuse_active_dropout():
    """The shared backward recomputes each block: a dropout there would draw a second mask."""
    from gm.errors import ConfigError

    engine = build_engine(OmegaConf.load(TINY).model)
    inject_lora(engine, LoRAConfig(rank=4, alpha=4, dropout=0.1, unet_targets=("attn",)))
    unet = engine.model.diffusion_model
    unet.set_train(True)
    p = OmegaConf.load(TINY).model.params.network_config.params
    rng = np.random.default_rng(3)
    inputs = [Tensor(rng.standard_normal((1, 4, 16, 16)).astype(np.float32)), Tensor(np.array([500], np.float32)),
              Tensor(rng.standard_normal((1, 77, p.context_dim)).astype(np.float32)),
              Tensor(rng.standard_normal((1, p.adm_in_channels)).astype(np.float32))]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        compile_in_pynative(unet, shared=True)
        with pytest.raises(ConfigError, match="--lora_dropout 0"):
            unet(*inputs)
    finally:
        run_eagerly(unet)
        ms.set_context(mode=ms.GRAPH_MODE)
