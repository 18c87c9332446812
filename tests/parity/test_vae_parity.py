"""Our AutoencoderKL (MindSpore, graph mode) against diffusers' AutoencoderKL on torch.

The tiny VAE of configs/inference/sd_xl_tiny.yaml is loaded from a diffusers folder and from an
official-format single file; posterior and decoded image must match the reference within
1e-4 * max(1, max |reference|) in float32.
"""

import logging
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
import reference
import torch
from diffusers import AutoencoderKL
from mindspore import Tensor
from omegaconf import OmegaConf
from safetensors.numpy import save_file

from gm.checkpoint import diffusers_vae
from gm.checkpoint.keymap import rule_shapes
from gm.checkpoint.load import load_diffusers_component, load_single_file_component, single_file_state_from_diffusers
from gm.checkpoint.safetensors_io import SafetensorsFile
from gm.modules.distributions import DiagonalGaussianDistribution, gaussian_sample
from gm.util import instantiate_from_config

IMAGE_SHAPE = (1, 3, 64, 64)
LATENT_SHAPE = (1, 4, 8, 8)


def build_vae(config_path=reference.TINY_CONFIG, **overrides):
    config = OmegaConf.load(config_path).model.params.first_stage_config
    for key, value in overrides.items():
        config.params.ddconfig[key] = value
    return instantiate_from_config(config)


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    diff = float(np.abs(ours - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert diff <= tol, f"{what}: max |diff| {diff:.3e} > {tol:.3e}"
    return diff


@pytest.fixture(scope="module")
def ref_vae():
    return reference.build_vae()


@pytest.fixture(scope="module")
def ref_state(ref_vae):
    return {k: v.detach().numpy() for k, v in ref_vae.state_dict().items()}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1.0, 1.0, IMAGE_SHAPE).astype(np.float32)
    latent = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    noise = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    return image, latent, noise


@pytest.fixture(scope="module")
def expected(ref_vae, inputs):
    image, latent, noise = inputs
    with torch.no_grad():
        posterior = ref_vae.encode(torch.from_numpy(image)).latent_dist
        decoded = ref_vae.decode(torch.from_numpy(latent)).sample
    return {"mean": posterior.mean.numpy(), "logvar": posterior.logvar.numpy(), "std": posterior.std.numpy(),
            "decoded": decoded.numpy()}


@pytest.fixture(scope="module")
def vae():
    """One graph-mode VAE; each test loads its own weights into it (compiled once per shape)."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model = build_vae()
    model.set_train(False)

    def encode(x):
        return model.encode(x)

    def moments(x):
        return model.moments(x)

    def decode(z):
        return model.decode(z)

    return SimpleNamespace(cell=model, encode=ms.jit(encode), moments=ms.jit(moments), decode=ms.jit(decode))


def _scramble(cell) -> None:
    for _, param in cell.parameters_and_names():
        param.set_data(Tensor(np.full(param.shape, 0.5, np.float32)))


def _check_outputs(vae, inputs, expected) -> dict:
    image, latent, _ = inputs
    mean, logvar = vae.encode(Tensor(image))
    decoded = vae.decode(Tensor(latent))
    return {
        "mean": assert_close(mean.asnumpy(), expected["mean"], "posterior mean"),
        "logvar": assert_close(logvar.asnumpy(), expected["logvar"], "posterior logvar"),
        "decoded": assert_close(decoded.asnumpy(), expected["decoded"], "decoded image"),
    }


def test_diffusers_folder_parity(vae, ref_vae, inputs, expected, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    ref_vae.save_pretrained(folder, safe_serialization=True)
    _scramble(vae.cell)
    assert load_diffusers_component(vae.cell, folder, "vae") == 248
    diffs = _check_outputs(vae, inputs, expected)
    logging.getLogger(__name__).info("diffusers folder: max |diff| %s", diffs)


def test_official_single_file_parity(vae, ref_state, inputs, expected, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "sd_xl_vae_official.safetensors"
    save_file(single_file_state_from_diffusers("vae", vae.cell, ref_state), str(path))

    # official names, checked against the diffusers tensors without our key map
    stored = SafetensorsFile(path)
    up0 = stored["first_stage_model.decoder.up.0.block.2.conv1.weight"]  # decoder level 0 = last diffusers up block
    np.testing.assert_array_equal(up0, ref_state["decoder.up_blocks.3.resnets.2.conv1.weight"])
    q = stored["first_stage_model.encoder.mid.attn_1.q.weight"]
    channels = ref_state["encoder.mid_block.attentions.0.to_q.weight"].shape[0]
    assert q.shape == (channels, channels, 1, 1)
    np.testing.assert_array_equal(q[:, :, 0, 0], ref_state["encoder.mid_block.attentions.0.to_q.weight"])
    assert stored.shape("first_stage_model.decoder.up.3.upsample.conv.weight") == (128, 128, 3, 3)
    assert stored.shape("first_stage_model.encoder.down.1.block.0.nin_shortcut.weight") == (64, 32, 1, 1)
    assert {k.split(".")[1] for k in stored} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}

    _scramble(vae.cell)
    assert load_single_file_component(vae.cell, path, "vae") == 248
    _check_outputs(vae, inputs, expected)


def test_posterior_sample(vae, ref_state, inputs, expected):
    load_single_file_component(vae.cell, single_file_state_from_diffusers("vae", vae.cell, ref_state), "vae")
    image, _, noise = inputs
    posterior = DiagonalGaussianDistribution(vae.moments(Tensor(image)))
    assert_close(posterior.std.asnumpy(), expected["std"], "posterior std")
    assert_close(posterior.var.asnumpy(), expected["std"] ** 2, "posterior var")
    want = expected["mean"] + expected["std"] * noise
    assert_close(posterior.sample(Tensor(noise)).asnumpy(), want, "posterior sample")
    assert_close(gaussian_sample(posterior.mean, posterior.logvar, Tensor(noise)).asnumpy(), want, "gaussian_sample")
    np.testing.assert_array_equal(posterior.mode().asnumpy(), posterior.mean.asnumpy())


def test_batch_of_non_square_images(vae, ref_vae, ref_state):
    """Batch 2 at 48x64 (landscape): the flattened-row convolutions and per-sample norms."""
    load_single_file_component(vae.cell, single_file_state_from_diffusers("vae", vae.cell, ref_state), "vae")
    image = np.random.default_rng(2).uniform(-1.0, 1.0, (2, 3, 48, 64)).astype(np.float32)
    with torch.no_grad():
        posterior = ref_vae.encode(torch.from_numpy(image)).latent_dist
        decoded = ref_vae.decode(posterior.mean).sample
    mean, logvar = vae.encode(Tensor(image))
    assert_close(mean.asnumpy(), posterior.mean.numpy(), "batch posterior mean")
    assert_close(logvar.asnumpy(), posterior.logvar.numpy(), "batch posterior logvar")
    assert_close(vae.decode(Tensor(posterior.mean.numpy())).asnumpy(), decoded.numpy(), "batch decoded image")


def test_logvar_clamped():
    moments = np.zeros((1, 8, 2, 2), np.float32)
    moments[:, 4:] = np.array([-100.0, 100.0, 0.5, -29.0], np.float32).reshape(1, 1, 2, 2)
    logvar = DiagonalGaussianDistribution(Tensor(moments)).logvar.asnumpy()
    np.testing.assert_array_equal(logvar[0, 0].ravel(), [-30.0, 20.0, 0.5, -29.0])


def test_rules_are_a_bijection_onto_diffusers_keys(vae, ref_state):
    rules = diffusers_vae.rules(vae.cell)
    ours = {name: tuple(p.shape) for name, p in vae.cell.parameters_and_names()}
    sources = [s for r in rules for s in r.sources]
    assert len(sources) == len(set(sources)), "a diffusers key feeds two parameters"
    assert set(sources) == set(ref_state) - set(diffusers_vae.IGNORED_SOURCE_KEYS)
    assert [r.target for r in rules] == list(ours)
    assert rule_shapes(rules, {k: v.shape for k, v in ref_state.items()}) == ours
    ops = {r.target: r.op for r in rules}
    assert ops["decoder.mid.attn_1.proj_out.weight"] == "linear_to_conv"
    assert ops["decoder.mid.attn_1.proj_out.bias"] == "copy"


def test_full_size_builds_without_memory():
    with ms.nn.utils.no_init_parameters():
        full = build_vae(reference.BASE_CONFIG)
    shapes = {name: tuple(p.shape) for name, p in full.parameters_and_names()}
    assert len(shapes) == 248
    assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
    with torch.device("meta"):  # the full-size reference, shapes only
        ref = AutoencoderKL(**reference.vae_config(reference.BASE_CONFIG))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert rule_shapes(diffusers_vae.rules(full), ref_shapes) == shapes


def test_attention_outside_mid_block_has_no_diffusers_key():
    with ms.nn.utils.no_init_parameters():
        model = build_vae(attn_resolutions=[16])
    assert any(".attn.0." in name for name, _ in model.parameters_and_names())
    with pytest.raises(ValueError, match="attn_resolutions"):
        diffusers_vae.rules(model)


@pytest.mark.parametrize("offset,scale", [(0.0, 3e-3), (30.0, 2.0)], ids=["small-variance", "large-mean"])
def test_group_norm_matches_torch(offset, scale):
    """The VAE's GroupNorm (eps 1e-6, two-pass CPU kernel) against torch's: a small-variance input
    pins the epsilon (1e-5 would be off by ~40%), a large-mean one the float32 accumulation."""
    from gm.modules.diffusionmodules.model import normalize

    rng = np.random.default_rng(1)
    x = (offset + scale * rng.standard_normal((2, 64, 32, 32))).astype(np.float32)
    norm = normalize(64)
    weight, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    norm.weight.set_data(Tensor(weight))
    norm.bias.set_data(Tensor(bias))

    def run(inp):
        return norm(inp)

    ours = ms.jit(run)(Tensor(x)).asnumpy()
    ref = torch.nn.functional.group_norm(torch.from_numpy(x), 32, torch.from_numpy(weight), torch.from_numpy(bias),
                                         eps=1e-6).numpy()
    assert_close(ours, ref, "group norm")
