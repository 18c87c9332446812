"""Cached frozen inputs (``--cache_latents``) give exactly what the per-step path gives for the same
draws: the same latents, conditioning and loss, with random crops and flips; releasing the VAE
and text encoders afterwards leaves training inputs intact."""

import os
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image
from tiny_training import build_tiny_engine

from gm.data.dreambooth import DreamBoothDataset
from gm.frozen_inputs import CachedInputs, FrozenInputs, latent_shape, release_frozen_modules
from gm.modules.diffusionmodules.loss import DreamBoothLoss
from gm.training import _PerSampleLoss, per_sample_draws

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambooth"
STEPS, BATCH, RESOLUTION = 8, 1, 64


@pytest.fixture(scope="module")
def setup(tiny_weights, tmp_path_factory):
    if not (DATA / "dog").is_dir():
        pytest.skip(f"{DATA} not found (../shared beside the checkout)")
    engine, _ = build_tiny_engine(tiny_weights, trainable=[])
    # landscape crops of the (square) photos, random crops and flips: several variants per photo,
    # each must be cached under its own key
    photos = tmp_path_factory.mktemp("landscape")
    for path in sorted((DATA / "dog").glob("*.jpg"))[:3]:
        with Image.open(path) as image:
            image.crop((0, 0, image.width, image.height * 2 // 3)).save(photos / path.name)
    dataset = DreamBoothDataset(photos, "a photo of sks dog", class_dir=DATA / "dog6",
                                class_prompt="a photo of a dog", resolution=RESOLUTION, center_crop=False,
                                random_flip=True, seed=3)
    batches = [dataset.batch(step, BATCH) for step in range(STEPS)]
    return engine, dataset, batches


def _inputs(frozen, engine, batch):
    posterior, noise, sigmas = per_sample_draws(0, batch["positions"], 2, latent_shape(batch["instance_pixels"]),
                                                engine.denoiser)
    latents, (crossattn, vector) = frozen(batch, posterior)
    return [latents.asnumpy(), noise, sigmas, crossattn.asnumpy(), vector.asnumpy()]


def test_cached_inputs_equal_per_step_inputs_and_loss(setup):
    engine, dataset, batches = setup
    positions = [p for b in batches for p in b["positions"]]
    cached = CachedInputs(engine, dataset, positions, chunk=2 * BATCH)
    variants = {v for b in batches for v in b["instance_variants"] + b["class_variants"]}
    assert set(cached.moments_by_variant) == variants
    assert len({v[1:] for v in variants}) > 2, "random crops/flips should give several variants"
    assert len(variants) > len({v[0] for v in variants})
    per_step = FrozenInputs(engine)
    per_sample = _PerSampleLoss(DreamBoothLoss(engine, with_prior_preservation=True))
    for batch in batches:
        ours, reference = _inputs(cached, engine, batch), _inputs(per_step, engine, batch)
        for name, a, b in zip(("latents", "noise", "sigmas", "crossattn", "vector"), ours, reference):
            np.testing.assert_array_equal(a, b, err_msg=name)
        loss_cached = per_sample(*(Tensor(a) for a in ours)).asnumpy()
        loss_per_step = per_sample(*(Tensor(a) for a in reference)).asnumpy()
        np.testing.assert_array_equal(loss_cached, loss_per_step)


def test_release_after_caching_keeps_the_inputs(tiny_weights, setup):
    _, dataset, batches = setup
    engine, _ = build_tiny_engine(tiny_weights, trainable=[])
    cached = CachedInputs(engine, dataset, [int(batches[0]["positions"][0])], chunk=2)
    before = _inputs(cached, engine, batches[0])
    total = sum(p.size for p in engine.get_parameters())
    unet = sum(p.size for p in engine.model.get_parameters())
    released = release_frozen_modules(engine, keep_sampling=False)
    assert released == total - unet  # everything but the UNet
    assert sum(p.size for p in engine.get_parameters()) == unet
    for a, b in zip(before, _inputs(cached, engine, batches[0])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="released"):
        engine.first_stage_model.encoder(Tensor(np.zeros((1, 3, 8, 8), np.float32)))


def test_the_probe_through_the_train_step_is_the_mean_per_sample_loss(tiny_weights, setup):
    """The progress probe reuses the compiled train step (``TrainStep.measure``): with 2 rows per
    half and prior preservation, its 5 rows make two whole halves, one leftover half of a repeated
    row, and a filler half that must count for nothing. It equals the mean of the rows'
    per-sample losses computed eagerly by the loss cell, and changes no weight."""
    from tiny_training import LATE_TRAINABLE

    from gm.frozen_inputs import eager
    from gm.optim import build_optimizer, parameter_groups
    from gm.train_step import TrainStep
    from gm.training import fixed_noise_instance_loss, probe_positions

    _, dataset, _ = setup
    engine, trainable = build_tiny_engine(tiny_weights, LATE_TRAINABLE)
    loss_cell = DreamBoothLoss(engine, with_prior_preservation=True, snr_gamma=5.0)
    step = TrainStep(loss_cell, build_optimizer(parameter_groups(engine, learning_rate=1e-3)))
    frozen = CachedInputs(engine, dataset, probe_positions(dataset), chunk=4)
    probes = {reuse: fixed_noise_instance_loss(step, frozen, dataset, seed=5, batch_size=2,
                                               reuse_train_step=reuse) for reuse in (True, False)}
    before = [p.asnumpy().copy() for p in trainable]
    through_step = probes[True]()
    with eager():
        per_sample_mean = probes[False]()
    assert through_step == pytest.approx(per_sample_mean, rel=1e-5)
    for old, param in zip(before, trainable):
        np.testing.assert_array_equal(old, param.asnumpy())
    assert int(step.optimizer.state_step.asnumpy()) == 0 and int(step.micro_step.asnumpy()) == 0


def test_stored_inputs_are_read_back_exactly_and_keyed_by_the_image_files(setup, tmp_path, monkeypatch):
    engine, dataset, batches = setup
    positions = [p for b in batches[:3] for p in b["positions"]]
    identity = {"weights": "tiny", "seed": 0}
    first = CachedInputs(engine, dataset, positions, chunk=2 * BATCH, store=tmp_path, identity=identity)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_encoding(*_):
        raise AssertionError("encoded again although the inputs are stored")

    with monkeypatch.context() as patch:
        patch.setattr(FrozenInputs, "moments", no_encoding)
        patch.setattr(FrozenInputs, "encode_conditioning", no_encoding)
        second = CachedInputs(engine, dataset, positions, chunk=2 * BATCH, store=tmp_path, identity=identity)
        for batch in batches[:3]:
            for a, b in zip(_inputs(first, engine, batch), _inputs(second, engine, batch)):
                np.testing.assert_array_equal(a, b)
        # another base model (identity) is another entry
        with pytest.raises(AssertionError, match="encoded again"):
            CachedInputs(engine, dataset, positions, chunk=2 * BATCH, store=tmp_path,
                         identity={**identity, "weights": "other"})
    # a replaced photo (new mtime) is encoded again, into a second entry
    photo = Path(next(iter(first.moments_by_variant))[0])
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    CachedInputs(engine, dataset, positions, chunk=2 * BATCH, store=tmp_path, identity=identity)
    assert len(list(tmp_path.glob("*.npz"))) == 2
