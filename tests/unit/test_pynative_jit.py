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
