"""The training step: AdamW, clipping, accumulation and loss scaling against torch; learning-rate
schedules against diffusers; accumulation, graph/PyNative agreement and overflow skipping on the
tiny SDXL with real weights. Graph mode unless a test says otherwise."""

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Parameter, Tensor, nn, ops
from tiny_training import LATE_TRAINABLE, TRAINABLE, build_tiny_engine, make_batch, to_tensors

from gm.errors import ConfigError
from gm.modules.diffusionmodules.loss import DreamBoothLoss
from gm.optim import LR_SCHEDULERS, LRSchedule, build_optimizer, parameter_groups
from gm.precision import apply_mixed_precision
from gm.train_step import LossScaleConfig, TrainStep, loss_scale_config

RTOL = 1e-5


def _assert_close(ours, theirs, what, rtol=RTOL):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    diff = np.abs(ours - theirs).max()
    assert diff <= rtol * max(np.abs(theirs).max(), 1e-12), f"{what}: max diff {diff:.3g}"


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


# -- mechanics on a toy model, against torch ---------------------------------------------------

class Toy(nn.Cell):
    """Per-sample squared error of a linear map; (loss, first-sample loss, second-sample loss)."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)), name="w")
        self.b = Parameter(Tensor(np.array([0.5, -0.5], np.float32)), name="b")

    def construct(self, x, y):
        per_sample = ((ops.matmul(x, self.w) + self.b - y) ** 2).mean(axis=1)
        return per_sample.mean(), per_sample[0], per_sample[1]


GROUPS = [dict(lr=0.1, weight_decay=0.1), dict(lr=0.02, weight_decay=0.0)]


def _toy_step(k, loss_scale, max_grad_norm=0.5, native=True):
    toy = Toy()
    groups = [dict(params=[p], **g) for p, g in zip((toy.w, toy.b), GROUPS)]
    optimizer = build_optimizer(groups, betas=(0.9, 0.99), eps=1e-6, native=native)
    assert (optimizer.native is not None) == native  # our one-kernel update on the CPU target, or MindSpore's
    return toy, TrainStep(toy, optimizer, grad_accum_steps=k, max_grad_norm=max_grad_norm, loss_scale=loss_scale)


def _toy_batches(n):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32))
            for _ in range(n)]


def _torch_reference(batches, k, schedule, max_grad_norm=0.5):
    """torch AdamW + clip_grad_norm_ + accumulation of loss / k; returns (params, norms) per update."""
    w = torch.linspace(-1, 1, 6).reshape(3, 2).requires_grad_(True)
    b = torch.tensor([0.5, -0.5], requires_grad=True)
    opt = torch.optim.AdamW([dict(params=[p], **g) for p, g in zip((w, b), GROUPS)], betas=(0.9, 0.99), eps=1e-6)
    results = []
    for update in range(len(batches) // k):
        for x, y in batches[update * k:(update + 1) * k]:
            per_sample = ((torch.from_numpy(x) @ w + b - torch.from_numpy(y)) ** 2).mean(dim=1)
            (per_sample.mean() / k).backward()
        norm = torch.nn.utils.clip_grad_norm_([w, b], max_grad_norm)
        for group, base in zip(opt.param_groups, GROUPS):
            group["lr"] = base["lr"] * schedule(update)
        opt.step()
        opt.zero_grad()
        results.append(([w.detach().numpy().copy(), b.detach().numpy().copy()], float(norm)))
    return results


@pytest.mark.parametrize("native", [True, False], ids=["one_kernel", "per_parameter"])
@pytest.mark.parametrize("k,loss_scale", [(2, LossScaleConfig()), (1, LossScaleConfig("static", init_scale=1024.0))])
def test_toy_updates_match_torch_adamw(k, loss_scale, native):
    """Decoupled weight decay, bias correction, per-group and per-update learning rates, clipping,
    the mean gradient over k micro-batches, and unscaling all agree with torch, with our one-kernel
    AdamW (gm.modules.native_adamw) and with MindSpore's kernel per parameter."""
    schedule = LRSchedule("cosine", warmup_steps=1, total_steps=4)
    batches = _toy_batches(4 * k)
    toy, step = _toy_step(k, loss_scale, native=native)
    expected = _torch_reference(batches, k, schedule)
    for update in range(4):
        lrs = step.learning_rates(schedule(update))
        for micro in range(k):
            out = step(lrs, *to_tensors(batches[update * k + micro]))
            assert bool(out[5].asnumpy()) == (micro == k - 1) and not bool(out[4].asnumpy())
        params, norm = expected[update]
        _assert_close(out[3].asnumpy(), norm, f"grad norm at update {update}")
        _assert_close(toy.w.asnumpy(), params[0], f"w after update {update}")
        _assert_close(toy.b.asnumpy(), params[1], f"b after update {update}")
    assert int(step.optimizer.state_step.asnumpy()) == 4


def test_toy_dynamic_loss_scale_backs_off_on_overflow_and_grows():
    toy, step = _toy_step(1, LossScaleConfig("dynamic", init_scale=4.0, growth_interval=2))
    (x, y), = _toy_batches(1)
    lrs = step.learning_rates(1.0)
    for expected_scale in (4.0, 4.0, 8.0):  # doubles after 2 clean updates
        assert float(step.loss_scale.asnumpy()) == expected_scale
        assert bool(step(lrs, Tensor(x), Tensor(y))[5].asnumpy())
    state = [p.asnumpy().copy() for p in (toy.w, toy.b, *step.optimizer.exp_avg, step.optimizer.state_step)]
    bad = x.copy()
    bad[0, 0] = np.inf
    out = step(lrs, Tensor(bad), Tensor(y))
    assert bool(out[4].asnumpy()) and not bool(out[5].asnumpy()) and not np.isfinite(out[3].asnumpy())
    after = [p.asnumpy() for p in (toy.w, toy.b, *step.optimizer.exp_avg, step.optimizer.state_step)]
    for before, now in zip(state, after):
        np.testing.assert_array_equal(before, now)
    assert float(step.loss_scale.asnumpy()) == 4.0 and int(step.growth_tracker.asnumpy()) == 0


def test_measure_returns_the_losses_and_changes_no_state():
    """The progress probe runs the compiled step with ``measure``: its losses are the forward's
    (numpy on the current weights), and interleaving measurements -- between updates, mid-way
    through an accumulation, with a non-finite batch -- leaves every update, the accumulation
    buffers, the micro-step count and the dynamic loss scale exactly as without them."""
    batches = _toy_batches(6)
    scale = LossScaleConfig("dynamic", init_scale=4.0, growth_interval=2)
    plain_toy, plain = _toy_step(2, scale)
    toy, step = _toy_step(2, scale)
    bad_x = batches[5][0].copy()
    bad_x[1, 1] = np.inf
    for i, batch in enumerate(batches[:4]):
        lrs = step.learning_rates(1.0)
        plain(lrs, *to_tensors(batch))
        for x, y in (batches[4], (bad_x, batches[5][1])):
            loss, first, second = (float(t.asnumpy()) for t in step.measure(Tensor(x), Tensor(y)))
            w, b = toy.w.asnumpy().astype(np.float64), toy.b.asnumpy().astype(np.float64)
            expected = ((x @ w + b - y) ** 2).mean(axis=1)
            if np.isfinite(x).all():
                _assert_close([loss, first, second], [expected.mean(), *expected], f"measured losses, call {i}")
            else:
                assert not np.isfinite(loss) and np.isfinite(first)
        step(lrs, *to_tensors(batch))
        states = [[p.asnumpy() for p in (s.micro_step, s.loss_scale, s.growth_tracker, *s.accum_grads,
                                         *s.state_parameters().values())] for s in (step, plain)]
        for ours, expected in zip(*states):
            np.testing.assert_array_equal(ours, expected)
    assert float(step.loss_scale.asnumpy()) == 8.0  # grown after 2 clean updates, never backed off


def test_loss_scale_config_and_validation():
    assert loss_scale_config("fp16", "static").kind == "static"
    assert loss_scale_config("fp16").kind == "dynamic"
    assert loss_scale_config("bf16").kind == loss_scale_config("fp32").kind == "none"
    with pytest.raises(ConfigError, match="expected none, static or dynamic"):
        LossScaleConfig("sometimes")
    toy = Toy()
    with pytest.raises(ConfigError, match="--gradient_accumulation_steps 0"):
        TrainStep(toy, build_optimizer([dict(params=[toy.w], lr=0.1, weight_decay=0.0)]), grad_accum_steps=0)


# -- learning-rate schedules against diffusers -------------------------------------------------

@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_lr_schedule_matches_diffusers(name):
    from diffusers.optimization import get_scheduler

    warmup, total = 3, 10
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    schedule = LRSchedule(name, warmup_steps=warmup, total_steps=total)
    for step in range(total + 2):
        assert 2.0 * schedule(step) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-12, abs=1e-12), step
        optimizer.step()
        scheduler.step()


def test_lr_schedule_validation():
    with pytest.raises(ConfigError, match="--lr_scheduler exponential: expected one of"):
        LRSchedule("exponential")
    with pytest.raises(ConfigError, match="needs the number of training steps"):
        LRSchedule("cosine", warmup_steps=2)


# -- parameter groups and precision --------------------------------------------------------------

def test_parameter_groups_split_unet_and_text_encoders(tiny_weights):
    text = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    engine, _ = build_tiny_engine(tiny_weights, TRAINABLE + [text])
    groups = parameter_groups(engine, learning_rate=1e-4, text_encoder_lr=5e-6, weight_decay=1e-2,
                              text_encoder_weight_decay=1e-3)
    assert [len(g["params"]) for g in groups] == [len(TRAINABLE), 1]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-4, 1e-2), (5e-6, 1e-3)]
    optimizer = build_optimizer(groups)
    assert [float(lr.asnumpy()) for lr in optimizer.lrs] == pytest.approx([1e-4, 5e-6])
    assert parameter_groups(engine, learning_rate=1e-4)[1]["lr"] == 1e-4  # text-encoder lr defaults to it

    dict(engine.parameters_and_names())["first_stage_model.decoder.conv_out.weight"].requires_grad = True
    with pytest.raises(ConfigError, match="first_stage_model.decoder.conv_out.weight is trainable"):
        parameter_groups(engine, learning_rate=1e-4)
    for param in engine.get_parameters():
        param.requires_grad = False
    with pytest.raises(ConfigError, match="no trainable parameters"):
        parameter_groups(engine, learning_rate=1e-4)


def test_mixed_precision_is_refused_on_cpu(tiny_weights):
    engine, _ = build_tiny_engine(tiny_weights)
    apply_mixed_precision(engine, "fp32")
    for precision in ("fp16", "bf16"):
        with pytest.raises(ConfigError, match=f"--mixed_precision {precision} needs --device_target Ascend or GPU"):
            apply_mixed_precision(engine, precision)
    with pytest.raises(ConfigError, match="--mixed_precision fp8: expected one of"):
        apply_mixed_precision(engine, "fp8")


# -- the DreamBooth step on the tiny SDXL --------------------------------------------------------

@pytest.fixture(scope="module")
def dreambooth(tiny_weights):
    """One engine and loss; steps with k = 1 (batch of 2 instance + 2 class) and k = 2 (1 + 1)."""
    engine, _ = build_tiny_engine(tiny_weights, LATE_TRAINABLE)
    loss_cell = DreamBoothLoss(engine, with_prior_preservation=True, prior_loss_weight=0.5, snr_gamma=5.0)

    def make_step(k):
        # Adam's update is ~lr * g / (|g| + eps): for entries with |g| near eps, float noise in g
        # (~1e-6 of the largest entry, from batching differently) becomes update noise of order lr.
        # eps 1e-6 (the median |g| is ~1e-4) keeps that below the tolerance; the gradients
        # themselves are compared through Adam's moments.
        groups = parameter_groups(engine, learning_rate=1e-4, weight_decay=1e-2)
        optimizer = build_optimizer(groups, eps=1e-6)
        return TrainStep(loss_cell, optimizer, grad_accum_steps=k, max_grad_norm=1.0)

    steps = {1: make_step(1), 2: make_step(2)}
    frozen = {id(p) for p in engine.get_parameters() if not p.requires_grad}
    mutable = {id(p): p for s in steps.values() for p in s.get_parameters() if id(p) not in frozen}
    initial = {key: p.asnumpy().copy() for key, p in mutable.items()}

    def reset():
        # ops.assign, not set_data: after a graph has run, set_data detaches a Parameter the graph
        # writes (the graph keeps updating the old memory; measured for AdamW's state_step)
        for key, param in mutable.items():
            ops.assign(param, Tensor(initial[key]))

    return engine, steps, reset


def _trainable(engine):
    return [p.asnumpy().copy() for p in engine.get_parameters() if p.requires_grad]


def _moments(step):
    """Adam's moments: after the first update exp_avg = 0.1 * g, exp_avg_sq = 0.001 * g^2."""
    return [p.asnumpy().copy() for p in (*step.optimizer.exp_avg, *step.optimizer.exp_avg_sq)]


def _micro_batches(rng, engine, n):
    """n micro-batches of 1 instance + 1 class sample."""
    return [make_batch(rng, 2, engine) for _ in range(n)]


def _merge(a, b):
    """Two 1+1 micro-batches -> one 2+2 batch, instance samples first."""
    return [np.concatenate([x[:1], y[:1], x[1:], y[1:]]) for x, y in zip(a, b)]


def test_accumulating_two_micro_batches_equals_one_batch_of_two(dreambooth):
    engine, steps, reset = dreambooth
    micro = _micro_batches(np.random.default_rng(10), engine, 4)
    reset()
    start = _trainable(engine)
    lrs = steps[2].learning_rates(1.0)
    for update in range(2):
        losses = [steps[2](lrs, *to_tensors(m)) for m in micro[2 * update:2 * update + 2]]
        assert [bool(out[5].asnumpy()) for out in losses] == [False, True]
    accumulated, accumulated_moments = _trainable(engine), _moments(steps[2])
    reset()
    for update in range(2):
        big = steps[1](lrs, *to_tensors(_merge(*micro[2 * update:2 * update + 2])))
    one_batch, one_batch_moments = _trainable(engine), _moments(steps[1])
    _assert_close(big[0].asnumpy(), np.mean([out[0].asnumpy() for out in losses]), "loss of the last update")
    _assert_close(big[3].asnumpy(), losses[1][3].asnumpy(), "gradient norm")
    for ours, theirs in zip(accumulated_moments, one_batch_moments):
        _assert_close(ours, theirs, "Adam moments (the gradients the optimizer saw)")
    for before, ours, theirs in zip(start, accumulated, one_batch):
        assert np.abs(theirs - before).max() > 1e-4  # the updates moved the weights
        _assert_close(ours, theirs, "weights after two updates")


def test_graph_mode_and_pynative_agree_over_five_steps(dreambooth):
    engine, steps, reset = dreambooth
    step = steps[2]
    micro = _micro_batches(np.random.default_rng(20), engine, 5)
    schedule = LRSchedule("linear", warmup_steps=1, total_steps=3)
    runs = []
    for mode in (ms.GRAPH_MODE, ms.PYNATIVE_MODE):
        reset()
        ms.set_context(mode=mode)
        try:
            outs = [step(step.learning_rates(schedule(i // 2)), *to_tensors(m)) for i, m in enumerate(micro)]
        finally:
            ms.set_context(mode=ms.GRAPH_MODE)
        runs.append(([[float(o.asnumpy()) for o in out[:4]] for out in outs], _trainable(engine)))
    (graph_losses, graph_weights), (pynative_losses, pynative_weights) = runs
    _assert_close(np.array(pynative_losses), np.array(graph_losses), "losses and gradient norms")
    for ours, theirs in zip(pynative_weights, graph_weights):
        _assert_close(ours, theirs, "weights after 5 steps")


def test_non_finite_gradients_skip_the_update(dreambooth):
    engine, steps, reset = dreambooth
    step = steps[2]
    reset()
    micro = _micro_batches(np.random.default_rng(30), engine, 4)
    lrs = step.learning_rates(1.0)
    step(lrs, *to_tensors(micro[0]))
    step(lrs, *to_tensors(micro[1]))  # one good update first: the optimizer state is not trivial
    state = [p.asnumpy().copy() for p in (*step.weights, *step.optimizer.exp_avg, *step.optimizer.exp_avg_sq,
                                          step.optimizer.state_step)]
    poisoned = list(micro[2])
    poisoned[0] = poisoned[0].copy()
    poisoned[0][0, 0, 0, 0] = np.inf
    first = step(lrs, *to_tensors(poisoned))
    assert not bool(first[4].asnumpy()) and not bool(first[5].asnumpy())  # not an update call yet
    second = step(lrs, *to_tensors(micro[3]))
    assert bool(second[4].asnumpy()) and not bool(second[5].asnumpy())
    after = [p.asnumpy() for p in (*step.weights, *step.optimizer.exp_avg, *step.optimizer.exp_avg_sq,
                                   step.optimizer.state_step)]
    for before, now in zip(state, after):
        np.testing.assert_array_equal(before, now)
    assert all(not np.abs(buffer.asnumpy()).max() for buffer in step.accum_grads)
    assert int(step.micro_step.asnumpy()) == 0
    # the next window trains normally
    step(lrs, *to_tensors(micro[2]))
    out = step(lrs, *to_tensors(micro[3]))
    assert bool(out[5].asnumpy()) and np.isfinite(float(out[3].asnumpy()))


def test_zero_init_residual_outputs_flag():
    """sgm zero-initialises the residual branches' last layers; False (a random base to train LoRA
    on) keeps them random, or every LoRA gradient would be 0."""
    from omegaconf import OmegaConf

    from gm.modules.attention import SpatialTransformer
    from gm.modules.diffusionmodules.openaimodel import ResBlock
    from gm.util import instantiate_from_config

    config = OmegaConf.load("configs/inference/sd_xl_tiny.yaml").model.params.network_config
    for zero_init in (True, False):
        config.params.zero_init_residual_outputs = zero_init
        unet = instantiate_from_config(config)
        params = {n: p.asnumpy() for n, p in unet.parameters_and_names()
                  if n.startswith("out.2.") or ".out_layers.3." in n or ".proj_out." in n}
        blocks = [c for _, c in unet.cells_and_names() if isinstance(c, (ResBlock, SpatialTransformer))]
        assert len(params) == 2 * (len(blocks) + 1)  # weight and bias of each block's last layer and out.2
        zeros = [name for name, value in params.items() if not np.abs(value).max()]
        assert (len(zeros) == len(params)) if zero_init else not zeros
