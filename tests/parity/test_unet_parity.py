"""Our UNetModel (tiny config) against diffusers' UNet2DConditionModel with the same weights.

The reference is built from the same YAML numbers with random weights (tests/reference.py),
saved with ``save_pretrained``, and loaded into our UNet two ways: as a diffusers folder and as an
official-format single file. The MindSpore forward runs in graph mode and is compiled once.
Tolerance (fp32): max |ours - reference| <= 1e-4 * max(1, max |reference|).
"""

import mindspore as ms
import numpy as np
import pytest
import reference
import torch
from mindspore import nn
from mindspore.common.initializer import initializer
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.numpy import save_file

from gm.checkpoint import diffusers_unet
from gm.checkpoint.keymap import check_rules, rule_shapes
from gm.checkpoint.load import load_diffusers_component, load_single_file_component, single_file_state_from_diffusers
from gm.modules.diffusionmodules.util import timestep_embedding
from gm.modules.pynative_jit import compile_in_pynative
from gm.util import instantiate_from_config

BATCH, LATENT, TOKENS = 2, 16, 77


def _tolerance(ref: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _network_config(path):
    return OmegaConf.load(path).model.params.network_config


@pytest.fixture(scope="module")
def ref_unet():
    return reference.build_unet()


@pytest.fixture(scope="module")
def ref_state(ref_unet):
    return {k: v.detach().numpy().copy() for k, v in ref_unet.state_dict().items()}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    p = _network_config(reference.TINY_CONFIG).params
    pooled = p.adm_in_channels - 6 * 256
    # time_ids = (original h, w, crop top, left, target h, w) as SDXL's micro-conditioning
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 32, 16, 1024, 1024]], np.float32)
    return dict(
        latents=rng.standard_normal((BATCH, p.in_channels, LATENT, LATENT)).astype(np.float32),
        timesteps=np.array([999, 250], np.float32),
        context=rng.standard_normal((BATCH, TOKENS, p.context_dim)).astype(np.float32),
        text_embeds=rng.standard_normal((BATCH, pooled)).astype(np.float32),
        time_ids=time_ids,
    )


@pytest.fixture(scope="module")
def ref_output(ref_unet, inputs):
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
    with torch.no_grad():
        return ref_unet(t["latents"], t["timesteps"], t["context"], added_cond_kwargs=added).sample.numpy()


@pytest.fixture(scope="module")
def vector(inputs):
    """Our y = [pooled text, emb(time_ids) flattened], 256 wide per id (sgm ConcatTimestepEmbedderND)."""
    ids = ms.Tensor(inputs["time_ids"].reshape(-1))
    micro = timestep_embedding(ids, 256).asnumpy().reshape(BATCH, -1)
    return np.concatenate([inputs["text_embeds"], micro], axis=1)


@pytest.fixture(scope="module")
def unet():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    net = instantiate_from_config(_network_config(reference.TINY_CONFIG))
    net.set_train(False)
    return net


def _run(net, inputs, vector) -> np.ndarray:
    args = (inputs["latents"], inputs["timesteps"], inputs["context"], vector)
    return net(*(ms.Tensor(a) for a in args)).asnumpy()


def _clear(net) -> None:
    """Zero every parameter, so a test passes only through what it loaded itself."""
    for param in net.get_parameters():
        param.set_data(initializer("zeros", param.shape, param.dtype).init_data())


def test_micro_conditioning_embedding_matches_diffusers(ref_unet, inputs, vector):
    with torch.no_grad():
        ids = torch.from_numpy(inputs["time_ids"]).flatten()
        theirs = ref_unet.add_time_proj(ids).reshape(BATCH, -1).numpy()
    ours = vector[:, inputs["text_embeds"].shape[1]:]
    # sin/cos of arguments up to 1024 in fp32: one ulp of the frequency is ~6e-5 of the argument
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_unet_from_diffusers_folder_matches_reference(unet, ref_unet, ref_output, inputs, vector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "unet"
    ref_unet.save_pretrained(folder, safe_serialization=True)
    _clear(unet)
    assert load_diffusers_component(unet, folder, "unet") == len(ref_unet.state_dict())
    out = _run(unet, inputs, vector)
    assert out.shape == ref_output.shape
    diff = float(np.abs(out - ref_output).max())
    assert diff <= _tolerance(ref_output), f"max diff {diff:.3g}, max |ref| {np.abs(ref_output).max():.3g}"


# official sgm names of the tiny (= SDXL base) topology, from REFERENCE.md's block mapping:
# down_blocks.b.{resnets,attentions}.a -> input_blocks.(1+3b+a).{0,1}; down_blocks.b.downsamplers.0
# -> input_blocks.3(b+1).0.op; up_blocks.b.upsamplers.0 -> output_blocks.(3b+2).{2 with attention, else 1}
OFFICIAL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": "conv_in.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": "down_blocks.1.attentions.0.proj_in.weight",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight":
        "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.0.proj.weight":
        "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "model.diffusion_model.output_blocks.5.1.proj_out.bias": "up_blocks.1.attentions.2.proj_out.bias",
    "model.diffusion_model.output_blocks.8.0.emb_layers.1.weight": "up_blocks.2.resnets.2.time_emb_proj.weight",
    "model.diffusion_model.time_embed.2.bias": "time_embedding.linear_2.bias",
    "model.diffusion_model.label_emb.0.0.weight": "add_embedding.linear_1.weight",
    "model.diffusion_model.out.0.weight": "conv_norm_out.weight",
    "model.diffusion_model.out.2.weight": "conv_out.weight",
}


def test_unet_from_official_single_file_matches_reference(unet, ref_state, ref_output, inputs, vector, tmp_path):
    path = tmp_path / "sd_xl_tiny.safetensors"
    save_file(single_file_state_from_diffusers("unet", unet, ref_state), str(path))
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        for official, diffusers_key in OFFICIAL_KEYS.items():
            assert official in keys, official
            np.testing.assert_array_equal(f.get_tensor(official), ref_state[diffusers_key])
    assert not [k for k in keys if not k.startswith("model.diffusion_model.")]
    assert len(keys) == len(ref_state)

    _clear(unet)
    assert load_single_file_component(unet, path, "unet") == len(ref_state)
    out = _run(unet, inputs, vector)
    diff = float(np.abs(out - ref_output).max())
    assert diff <= _tolerance(ref_output), f"max diff {diff:.3g}, max |ref| {np.abs(ref_output).max():.3g}"


def _assert_bijection(net, ref_shapes):
    rules = diffusers_unet.rules(net)
    check_rules(rules, ref_shapes, what="reference unet", ignore_unused=diffusers_unet.IGNORED_SOURCE_KEYS,
                optional_targets=diffusers_unet.OPTIONAL_TARGETS)
    sources = [s for r in rules for s in r.sources]
    assert len(sources) == len(set(sources)) == len(ref_shapes)
    assert set(sources) == set(ref_shapes)
    ours = {name: tuple(p.shape) for name, p in net.parameters_and_names()}
    assert [r.target for r in rules] == list(ours)
    assert rule_shapes(rules, ref_shapes) == ours


def test_rules_are_a_bijection_tiny(unet, ref_state):
    _assert_bijection(unet, {k: v.shape for k, v in ref_state.items()})


def test_full_size_unet_builds_without_memory_and_maps_onto_diffusers():
    with nn.utils.no_init_parameters():
        net = instantiate_from_config(_network_config(reference.BASE_CONFIG))
    shapes = [p.shape for p in net.get_parameters()]
    assert len(shapes) == 1680
    assert sum(int(np.prod(s)) for s in shapes) == 2_567_463_684
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**reference.unet_config(reference.BASE_CONFIG))
    _assert_bijection(net, {k: tuple(v.shape) for k, v in ref.state_dict().items()})


def test_norm_epsilons_match_reference(unet, ref_unet):
    """Each norm's eps equals the reference's (a wrong eps shifts outputs by less than the tolerance)."""
    ours = dict(unet.cells_and_names())
    by_source = {r.sources[0]: r.target for r in diffusers_unet.rules(unet)}
    checked = 0
    for name, module in ref_unet.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            cell = ours[by_source[f"{name}.weight"].rsplit(".", 1)[0]]
            assert cell.eps == module.eps, f"{name}: ours {cell.eps}, reference {module.eps}"
            checked += 1
    assert checked == len([k for k in by_source if "norm" in k and k.endswith(".weight")])


# a parameter of each kind of block, by our (official) name
GRAD_PARAMS = [
    "input_blocks.0.0.weight",
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "input_blocks.7.1.transformer_blocks.1.ff.net.0.proj.weight",
    "middle_block.1.transformer_blocks.0.attn2.to_v.weight",
    "output_blocks.2.2.conv.weight",
    "output_blocks.8.0.skip_connection.weight",
    "time_embed.0.weight",
    "label_emb.0.0.weight",
]


def _gradient_pairs(unet, ref_unet, inputs, vector, compile_grad: bool):
    """(name, ours, reference) for d(sum(out * w))/d(params, latents), ours against torch autograd."""
    weights = np.random.default_rng(1).standard_normal(inputs["latents"].shape).astype(np.float32)
    params = dict(unet.parameters_and_names())
    grad_params = [params[name] for name in GRAD_PARAMS]
    w = ms.Tensor(weights)

    def loss_fn(x, t, c, y):
        return (unet(x, t, c, y) * w).sum()

    grad_fn = ms.grad(loss_fn, grad_position=0, weights=grad_params)
    grad_fn = ms.jit(grad_fn) if compile_grad else grad_fn
    x_grad, param_grads = grad_fn(*(ms.Tensor(a) for a in (inputs["latents"], inputs["timesteps"],
                                                            inputs["context"], vector)))

    latents = torch.from_numpy(inputs["latents"]).requires_grad_(True)
    added = {"text_embeds": torch.from_numpy(inputs["text_embeds"]), "time_ids": torch.from_numpy(inputs["time_ids"])}
    ref_unet.zero_grad()
    out = ref_unet(latents, torch.from_numpy(inputs["timesteps"]), torch.from_numpy(inputs["context"]),
                   added_cond_kwargs=added).sample
    (out * torch.from_numpy(weights)).sum().backward()
    ref_params = dict(ref_unet.named_parameters())
    names = [diffusers_unet.diffusers_name(unet, name) for name in GRAD_PARAMS]
    pairs = [("latents", x_grad.asnumpy(), latents.grad.numpy())]
    return pairs + [(n, g.asnumpy(), ref_params[d].grad.numpy()) for n, g, d in zip(GRAD_PARAMS, param_grads, names)]


def _assert_pairs_close(pairs):
    for name, ours, theirs in pairs:
        diff = float(np.abs(ours - theirs).max())
        assert diff <= _tolerance(theirs), f"{name}: max diff {diff:.3g}, max |ref| {np.abs(theirs).max():.3g}"


def test_unet_gradients_match_reference(unet, ref_unet, ref_state, inputs, vector):
    """Backward parity (training): d(sum(out * w))/d(params, latents) against torch autograd."""
    _clear(unet)
    load_single_file_component(unet, single_file_state_from_diffusers("unet", unet, ref_state), "unet")
    _assert_pairs_close(_gradient_pairs(unet, ref_unet, inputs, vector, compile_grad=True))


@pytest.mark.parametrize("shared", [False, True], ids=["levels", "shared_blocks"])
def test_pynative_with_compiled_levels_matches_reference(ref_unet, ref_state, ref_output, inputs, vector, shared):
    """``--pynative_jit``: in PyNative each UNet level runs as a compiled graph and MindSpore
    differentiates through them, or (``shared``) each block runs one compiled graph per block
    structure with its own custom backward; output and gradients are still the reference's."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        net = instantiate_from_config(_network_config(reference.TINY_CONFIG))
        net.set_train(False)
        load_single_file_component(net, single_file_state_from_diffusers("unet", net, ref_state), "unet")
        switched = compile_in_pynative(net, shared=shared)
        assert switched == (34 if shared else len(net.input_blocks) + 1 + len(net.output_blocks))
        ours = _run(net, inputs, vector)
        diff = float(np.abs(ours - ref_output).max())
        assert diff <= _tolerance(ref_output), f"max diff {diff:.3g}"
        _assert_pairs_close(_gradient_pairs(net, ref_unet, inputs, vector, compile_grad=False))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
