"""LoRA on the tiny SDXL with real (non-degenerate) weights: step 0 is the base model, only LoRA
factors train and all of them get gradients (text encoders included), merge/unmerge, LoRA files.

Forward passes run in graph mode (one compiled conditioner and denoiser per structure, shared by
the module); a PyNative check covers the other mode.
"""

import re

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from gm.checkpoint.errors import CheckpointError
from gm.checkpoint.load import engine_state, load_weights
from gm.checkpoint.lora import load_lora, read_lora_file, save_lora
from gm.checkpoint.safetensors_io import save_safetensors
from gm.errors import ConfigError
from gm.inference import DenoiseStep
from gm.models.diffusion import build_engine
from gm.modules.layers import Linear
from gm.modules.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    is_lora_parameter,
    lora_config_of,
    lora_modules,
    lora_parameters,
    lora_state,
    mark_only_lora_trainable,
    merge_lora,
    set_lora_values,
    unmerge_lora,
)

CONFIG = LoRAConfig(rank=4, alpha=8.0, unet_targets=("attn", "ff", "proj"), text_encoder=True)
BATCH = {"txt": ["a photo of sks dog", "a dog on the beach"], "original_size_as_tuple": [[64, 64]] * 2,
         "crop_coords_top_left": [[0, 0]] * 2, "target_size_as_tuple": [[64, 64]] * 2}


pytestmark = pytest.mark.usefixtures("graph_mode")  # conftest: graph mode, restored after


def _base_engine(tiny_weights):
    engine = build_engine(tiny_weights.config)
    load_weights(engine, tiny_weights.single_file)
    return engine


class Forward:
    """Compiled conditioner + denoiser of one engine on fixed inputs -> (crossattn, vector, denoised)."""

    def __init__(self, engine):
        rng = np.random.default_rng(0)
        self.engine = engine
        self.cond_inputs = engine.conditioner.prepare_inputs(BATCH)
        self.x = Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
        self.sigma = Tensor(np.array([0.5, 8.0], np.float32))
        self.rebuild()

    def rebuild(self):
        """New compiled cells (after the engine's structure changed)."""
        self.step = DenoiseStep(self.engine)

    def __call__(self):
        crossattn, vector = self.engine.conditioner(*self.cond_inputs)
        denoised = self.step(self.x, self.sigma, crossattn, vector)
        return crossattn.asnumpy(), vector.asnumpy(), denoised.asnumpy()


def _randomize_lora_up(engine, seed=1, std=0.2):
    rng = np.random.default_rng(seed)
    values = {name: rng.standard_normal(p.shape).astype(np.float32) * std
              for name, p in lora_parameters(engine).items() if ".lora_up." in name}
    set_lora_values(engine, values)


@pytest.fixture(scope="module")
def lora(tiny_weights):
    """One engine: base outputs, then injected (step 0) outputs, then outputs with nonzero lora_up."""
    engine = _base_engine(tiny_weights)
    forward = Forward(engine)
    base_out = forward()
    base_state = engine_state(engine)
    inject_lora(engine, CONFIG)
    step0_out = forward()  # inject_lora dropped the compiled graphs: this compiles the LoRA model
    step0_state = lora_state(engine)
    _randomize_lora_up(engine)
    lora_out = forward()  # same graph, new parameter values
    return dict(engine=engine, forward=forward, base_out=base_out, base_state=base_state, step0_out=step0_out,
                step0_state=step0_state, lora_out=lora_out)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_step_zero_is_exactly_the_base_model(lora):
    for base, step0, what in zip(lora["base_out"], lora["step0_out"], ("crossattn", "vector", "denoised")):
        assert np.array_equal(base, step0), f"{what} differs at step 0 by {np.abs(base - step0).max()}"
    # and the fixed inputs exercise the model (no zero output hiding a difference)
    assert all(np.abs(out).max() > 0.1 for out in lora["base_out"])
    # lora_up starts at zero, lora_down is kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)) as torch/PEFT
    for name, value in lora["step0_state"].items():
        if ".lora_up." in name:
            assert not value.any(), name
        else:
            bound = 1 / np.sqrt(value.shape[1])
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.5 * bound, name


def test_a_nonzero_lora_changes_unet_and_text_encoder_outputs(lora):
    for base, out in zip(lora["base_out"], lora["lora_out"]):
        assert _rel(out, base) > 1e-3


def _expected_lora_count(base_names):
    """Count the targets from the *base* parameter names (independent of gm.modules.lora)."""
    unet = (r"model\.diffusion_model\..*\.transformer_blocks\.\d+\."
            r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))\.weight")
    proj = r"model\.diffusion_model\..*\.(proj_in|proj_out)\.weight"
    # CLIP-L: SDXL uses the penultimate hidden state (layer_idx 2 of 3): only layers 0 and 1 run
    clip_l = r"conditioner\.embedders\.0\..*\.layers\.[01]\.self_attn\.(q|k|v|out)_proj\.weight"
    packed = r"conditioner\.embedders\.1\..*\.resblocks\.\d+\.attn\.in_proj_weight"
    open_clip_out = r"conditioner\.embedders\.1\..*\.resblocks\.\d+\.attn\.out_proj\.weight"
    count = {k: sum(bool(re.fullmatch(p, n)) for n in base_names)
             for k, p in (("unet", unet), ("proj", proj), ("clip_l", clip_l), ("packed", packed),
                          ("open_clip_out", open_clip_out))}
    assert count == {"unet": 170, "proj": 22, "clip_l": 8, "packed": 3, "open_clip_out": 3}
    modules = count["unet"] + count["proj"] + count["clip_l"] + 3 * count["packed"] + count["open_clip_out"]
    return 2 * modules


def test_names_and_only_lora_parameters_are_trainable(lora):
    engine, base_names = lora["engine"], set(lora["base_state"])
    names = [n for n, _ in engine.parameters_and_names()]
    lora_names = [n for n in names if is_lora_parameter(n)]
    assert set(names) - set(lora_names) == base_names  # base names unchanged, nothing else added
    assert len(lora_names) == _expected_lora_count(base_names) == 424
    assert lora_names == list(lora_parameters(engine))
    params = lora_parameters(engine)
    block = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0."
    assert params[block + "attn1.to_q.lora_down.weight"].shape == (4, 64)
    assert params[block + "attn2.to_k.lora_down.weight"].shape == (4, 96)  # cross-attention: context width
    assert params[block + "attn1.to_out.0.lora_up.weight"].shape == (64, 4)
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn."
    assert params[te2 + "in_proj_v.lora_up.weight"].shape == (64, 4)
    # Parameter.name == structural name: unique names for graph compile and optimizers
    assert all(p.name == n for n, p in engine.parameters_and_names())

    assert mark_only_lora_trainable(engine) == 424
    assert sorted(p.name for p in engine.trainable_params()) == sorted(lora_names)
    assert engine.conditioner.frozen == (False, False, True, True, True)

    modules = {m.name: m for m in lora_modules(engine)}
    assert len(modules) == 212
    q = modules[te2 + "in_proj_q"]
    assert (q.weight, q.rows, q.component) == (te2 + "in_proj_weight", (0, 64), "text_encoder_2")
    assert modules[block + "attn1.to_q"].component == "unet" and modules[block + "attn1.to_q"].rows is None


class _Loss(nn.Cell):
    """mean(denoiser(x, sigma, conditioner(prompt ids, sizes))^2): text encoders inside the graph."""

    def __init__(self, engine):
        super().__init__(auto_prefix=False)
        self.engine = engine

    def construct(self, x, sigma, *cond_inputs):
        crossattn, vector = self.engine.conditioner(*cond_inputs)
        denoised = self.engine.denoise(x, sigma, crossattn, vector)
        return (denoised * denoised).mean()


class _Grads(nn.Cell):
    def __init__(self, loss, weights):
        super().__init__(auto_prefix=False)
        self.loss = loss
        self.weights = weights
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, *inputs):
        return self.grad(self.loss, self.weights)(*inputs)


def test_every_lora_parameter_gets_a_gradient_through_the_conditioner(lora):
    engine, forward = lora["engine"], lora["forward"]
    mark_only_lora_trainable(engine)
    params = lora_parameters(engine)
    grads = _Grads(_Loss(engine), ms.ParameterTuple(list(params.values())))(
        forward.x, forward.sigma, *forward.cond_inputs)
    assert len(grads) == len(params)
    norms = {name: float(np.abs(g.asnumpy()).max()) for name, g in zip(params, grads)}
    dead = [n for n, v in norms.items() if not v > 0]
    assert not dead, f"{len(dead)} LoRA parameters without gradient, e.g. {dead[:3]}"
    assert any(n.startswith("conditioner.embedders.0.") for n in norms)
    assert any(".in_proj_q.lora_down." in n for n in norms)


def test_pynative_forward_and_grad_agree_with_graph_mode(lora):
    engine, forward = lora["engine"], lora["forward"]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        # both text encoders with LoRA (CLIP-L linear, OpenCLIP-G packed q/k/v) run eagerly
        crossattn, vector = engine.conditioner(*forward.cond_inputs)
        # a single LoRALinear under ms.value_and_grad
        layer = LoRALinear(Linear(8, 6), rank=2, alpha=4.0)
        layer.lora_up.weight.set_data(Tensor(np.full((6, 2), 0.5, np.float32)))
        x = Tensor(np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32))

        def loss_fn(inputs):
            return (layer(inputs) ** 2).sum()

        weights = [layer.lora_down.weight, layer.lora_up.weight]
        loss, grads = ms.value_and_grad(loss_fn, None, weights)(x)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert _rel(crossattn.asnumpy(), lora["lora_out"][0]) < 1e-5
    assert _rel(vector.asnumpy(), lora["lora_out"][1]) < 1e-5
    w, b = layer.weight.asnumpy(), layer.bias.asnumpy()
    down, up = layer.lora_down.weight.asnumpy(), layer.lora_up.weight.asnumpy()
    expected = x.asnumpy() @ w.T + b + 2.0 * (x.asnumpy() @ down.T) @ up.T  # scale = alpha / rank = 2
    assert abs(float(loss) - float((expected ** 2).sum())) < 1e-4 * float((expected ** 2).sum())
    assert all(np.abs(g.asnumpy()).max() > 0 for g in grads)


def test_merge_matches_unmerged_and_unmerge_restores(lora):
    engine, forward = lora["engine"], lora["forward"]
    before = engine_state(engine)
    assert merge_lora(engine) == 212
    try:
        # merged: the base structure and names, so it could be saved as an official checkpoint
        assert set(engine_state(engine)) == set(lora["base_state"])
        forward.rebuild()
        merged_out = forward()
    finally:
        assert unmerge_lora(engine) == 212
        forward.rebuild()
    for merged, unmerged in zip(merged_out, lora["lora_out"]):
        assert _rel(merged, unmerged) < 1e-5
    after = engine_state(engine)
    assert list(after) == list(before)
    worst = max(float(np.abs(after[n] - before[n]).max()) for n in before)
    assert worst <= 1e-6
    assert all(np.array_equal(after[n], before[n]) for n in before if is_lora_parameter(n))


@pytest.fixture(scope="module")
def lora_files(lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_files")
    paths = {}
    for suffix in ("safetensors", "ckpt"):
        paths[suffix] = root / f"sks_lora.{suffix}"
        assert save_lora(lora["engine"], paths[suffix], {"base_model": "tiny", "step": 3}) == 424
    return paths


def test_save_load_round_trip(lora, lora_files, tiny_weights):
    saved = lora_state(lora["engine"])
    arrays, metadata = read_lora_file(lora_files["safetensors"])
    assert set(arrays) == set(saved) and all(is_lora_parameter(k) for k in arrays)
    assert {k: metadata[k] for k in ("lora_rank", "lora_alpha", "lora_unet_targets", "lora_text_encoder",
                                      "base_model", "step", "gm_lora_format_version")} == {
        "lora_rank": "4", "lora_alpha": "8.0", "lora_unet_targets": "attn,ff,proj", "lora_text_encoder": "true",
        "base_model": "tiny", "step": "3", "gm_lora_format_version": "1"}

    # .ckpt into a fresh engine (first: injecting drops compiled graphs, see gm.modules.lora)
    other = build_engine(tiny_weights.config)
    assert load_lora(other, lora_files["ckpt"])["base_model"] == "tiny"
    assert all(np.array_equal(v, saved[k]) for k, v in lora_state(other).items())

    fresh = _base_engine(tiny_weights)
    assert load_lora(fresh, lora_files["safetensors"])["step"] == "3"
    assert lora_config_of(fresh) == CONFIG
    assert all(np.array_equal(v, saved[k]) for k, v in lora_state(fresh).items())
    forward = Forward(fresh)
    for ours, expected in zip(forward(), lora["lora_out"]):
        np.testing.assert_array_equal(ours, expected)
    # .ckpt into an engine that already has this LoRA: values replaced, same compiled graph
    set_lora_values(fresh, {k: np.zeros_like(v) for k, v in saved.items()})
    load_lora(fresh, lora_files["ckpt"])
    for ours, expected in zip(forward(), lora["lora_out"]):
        np.testing.assert_array_equal(ours, expected)


def test_bad_lora_files_are_rejected(lora, lora_files, tiny_weights, tmp_path):
    arrays, metadata = read_lora_file(lora_files["safetensors"])
    with_base = tmp_path / "with_base.safetensors"
    save_safetensors(with_base, {**arrays, "model.diffusion_model.out.2.weight": np.zeros((4, 32, 3, 3))}, metadata)
    with pytest.raises(CheckpointError, match="1 \\(first: model.diffusion_model.out.2.weight\\) keys are not LoRA"):
        load_lora(lora["engine"], with_base)
    missing = tmp_path / "missing.safetensors"
    dropped = "model.diffusion_model.input_blocks.4.1.proj_in.lora_down.weight"
    save_safetensors(missing, {k: v for k, v in arrays.items() if k != dropped}, metadata)
    with pytest.raises(CheckpointError, match=f"missing 1 \\(first: {dropped}\\), unexpected 0"):
        load_lora(lora["engine"], missing)
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        load_lora(lora["engine"], tiny_weights.single_file)
    with pytest.raises(CheckpointError, match="a LoRA file\\? give it after the base weights"):
        load_weights(lora["engine"], lora_files["ckpt"])  # the swapped order

    # a rank-8 LoRA into a model holding a rank-4 one
    rank8 = build_engine(tiny_weights.config)
    inject_lora(rank8, LoRAConfig(rank=8, alpha=8.0, unet_targets=("attn", "ff", "proj"), text_encoder=True))
    rank8_file = tmp_path / "rank8.ckpt"
    save_lora(rank8, rank8_file)
    with pytest.raises(CheckpointError, match="LoRA rank 8 alpha 8 .* does not match the model's rank 4"):
        load_lora(lora["engine"], rank8_file)
    # rank-8 tensors whose metadata says rank 4, into a fresh model: nothing is injected
    lying = tmp_path / "lying.safetensors"
    save_safetensors(lying, read_lora_file(rank8_file)[0], metadata)
    fresh = build_engine(tiny_weights.config)
    with pytest.raises(CheckpointError, match="424 LoRA tensors have the wrong shape .* file \\(8, "):
        load_lora(fresh, lying)
    assert lora_config_of(fresh) is None and not lora_parameters(fresh)
    # the model's own values never changed
    saved = read_lora_file(lora_files["ckpt"])[0]
    assert all(np.array_equal(v, saved[k]) for k, v in lora_state(lora["engine"]).items())


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "--lora_rank must be an integer >= 1, got 0"),
    ({"rank": 2.5}, "--lora_rank must be an integer >= 1"),
    ({"alpha": -1.0}, "--lora_alpha must be a number > 0"),
    ({"dropout": 1.0}, "--lora_dropout must be in \\[0, 1\\)"),
    ({"unet_targets": ("attn", "conv")}, "--lora_unet_targets: unknown group\\(s\\) \\['conv'\\]"),
    ({"unet_targets": ()}, "nothing to train"),
])
def test_config_validation_names_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoRAConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_config_defaults_and_metadata_round_trip():
    config = LoRAConfig(rank=8)
    assert (config.alpha, config.scale, config.unet_targets, config.text_encoder) == (8.0, 1.0, ("attn",), False)
    custom = LoRAConfig(rank=16, alpha=4, dropout=0.1, unet_targets=("proj", "attn"), text_encoder=True)
    assert custom.unet_targets == ("attn", "proj") and custom.scale == 0.25
    assert LoRAConfig.from_metadata(custom.to_metadata()) == custom


def test_injecting_twice_is_refused(tiny_weights):
    engine = build_engine(tiny_weights.config)
    inject_lora(engine, LoRAConfig(rank=2))
    assert len(lora_parameters(engine)) == 2 * 8 * 17
    with pytest.raises(ConfigError, match="already has LoRA layers"):
        inject_lora(engine, LoRAConfig(rank=2))


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_float32_lora_on_float16_base_and_dropout_only_in_training(mode):
    ms.set_context(mode=mode)
    try:
        base = Linear(8, 6, dtype=ms.float16)
        layer = LoRALinear(base, rank=2, alpha=2.0, dtype=ms.float32)
        layer.lora_up.weight.set_data(Tensor(np.full((6, 2), 0.5, np.float32)))
        x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float16)
        y = layer(Tensor(x))
        noisy = LoRALinear(Linear(8, 6), rank=2, alpha=2.0, dropout=0.5)
        noisy.lora_up.weight.set_data(Tensor(np.full((6, 2), 0.5, np.float32)))
        ones = Tensor(np.ones((3, 8), np.float32))
        noisy.set_train(True)
        train = noisy(ones).asnumpy()
        noisy.set_train(False)
        evaluation = noisy(ones).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    x32 = x.astype(np.float32)
    expected = (x32 @ base.weight.asnumpy().astype(np.float32).T + base.bias.asnumpy()
                + (x32 @ layer.lora_down.weight.asnumpy().T) @ layer.lora_up.weight.asnumpy().T)
    assert y.dtype == ms.float16 and layer.lora_down.weight.dtype == ms.float32
    assert np.abs(y.asnumpy().astype(np.float32) - expected).max() < 2e-3 * np.abs(expected).max()
    w, b = noisy.weight.asnumpy(), noisy.bias.asnumpy()
    down, up = noisy.lora_down.weight.asnumpy(), noisy.lora_up.weight.asnumpy()
    # atol: the weights are randomly initialised, so an output can land near 0 where float32's
    # summation order alone exceeds any relative tolerance (seen: -3.56e-05 off by 9e-08)
    np.testing.assert_allclose(evaluation, ones.asnumpy() @ w.T + b + (ones.asnumpy() @ down.T) @ up.T,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(train, evaluation)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lora_dropout_changes_train_step_gradients_only_in_training_mode(dropout):
    from gm.optim import build_optimizer
    from gm.train_step import TrainStep

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layer = LoRALinear(Linear(8, 6), rank=2, alpha=2.0, dropout=dropout)
            self.layer.lora_up.weight.set_data(Tensor(np.full((6, 2), 0.5, np.float32)))

        def construct(self, x):
            loss = ops.square(self.layer(x)).mean()
            return loss, loss, loss

    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        cell = Loss()
        params = [cell.layer.lora_down.weight, cell.layer.lora_up.weight]
        step = TrainStep(cell, build_optimizer([{"params": params, "lr": 0.0}]), max_grad_norm=0)
        x = Tensor(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
        lrs = step.learning_rates(0.0)  # lr 0: the weights stay put, only the gradients are compared
        norms = {}
        for training in (False, True):
            step.set_train(training)
            norms[training] = float(step(lrs, x)[3].asnumpy())
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    if dropout:
        assert abs(norms[True] - norms[False]) > 1e-3 * norms[False], norms
    else:
        assert norms[True] == norms[False], norms
