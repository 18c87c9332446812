"""GeneralConditioner plumbing on the tiny config: YAML validation, batch checks, output layout,
the unconditional branch's zeroing, frozen embedders. (Numbers vs diffusers: tests/parity.)"""

import mindspore as ms
import numpy as np
import pytest
import reference
from omegaconf import OmegaConf

from gm.modules import GeneralConditioner
from gm.util import instantiate_from_config


def _entries():
    cfg = OmegaConf.load(reference.TINY_CONFIG).model.params.conditioner_config
    return OmegaConf.to_container(cfg.params.emb_models)


@pytest.fixture(scope="module")
def conditioner():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = OmegaConf.load(reference.TINY_CONFIG).model.params.conditioner_config
    assert cfg.target == "gm.modules.GeneralConditioner"
    yield instantiate_from_config(cfg)
    ms.set_context(mode=previous)


def _batch(n=2):
    return {"txt": ["a photo of sks dog", "a dog"][:n],
            "original_size_as_tuple": np.array([[1024, 768], [512, 512]][:n]),
            "crop_coords_top_left": (16, 32), "target_size_as_tuple": [[1024, 1024]] * n}


def test_layout_and_frozen_parameters(conditioner):
    names = [n for n, _ in conditioner.parameters_and_names()]
    assert "embedders.0.transformer.text_model.final_layer_norm.weight" in names
    assert "embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in names
    assert "embedders.1.model.logit_scale" in names
    assert not conditioner.trainable_params()
    out = conditioner.encode(_batch())
    assert out["crossattn"].shape == (2, 77, 96) and out["vector"].shape == (2, 1600)


def test_output_shapes_are_those_encode_returns(conditioner):
    for n in (1, 2):
        shapes = conditioner.output_shapes(_batch(n))
        out = conditioner.encode(_batch(n))
        assert shapes == {key: tuple(value.shape) for key, value in out.items()}
        assert {value.dtype for value in out.values()} == {ms.float32}


def test_single_size_is_repeated(conditioner):
    arrays = conditioner.prepare_arrays(_batch())
    np.testing.assert_array_equal(arrays[3], [[16, 32], [16, 32]])
    assert arrays[0].dtype == np.int32 and arrays[2].dtype == np.float32


def test_unconditional_zeroes_only_text_outputs(conditioner):
    cond, uncond = conditioner.get_unconditional_conditioning(_batch())
    assert not np.abs(uncond["crossattn"].asnumpy()).max()
    vector, uc_vector = cond["vector"].asnumpy(), uncond["vector"].asnumpy()
    assert not np.abs(uc_vector[:, :64]).max() and np.abs(vector[:, :64]).max() > 0
    np.testing.assert_array_equal(uc_vector[:, 64:], vector[:, 64:])
    _, encoded = conditioner.get_unconditional_conditioning(_batch(), {**_batch(), "txt": ["", ""]}, ())
    assert np.abs(encoded["crossattn"].asnumpy()).max() > 0


def test_caption_drop_in_the_graph_is_the_unconditional_branch(conditioner):
    # Pretraining with trained text encoders drops captions inside the graph; a dropped sample
    # must see what sampling's unconditional branch feeds the UNet, a kept one the full conditioning.
    from gm.modules.diffusionmodules.loss import CaptionDropConditioning

    arrays = conditioner.prepare_arrays(_batch())
    keep = conditioner.keep_masks(arrays, {"txt"})
    drop_cell = CaptionDropConditioning(conditioner, tuple((1.0 - keep[k])[None] for k in ("crossattn", "vector")))
    crossattn, vector = drop_cell(*(ms.Tensor(a) for a in arrays), ms.Tensor(np.array([0.0, 1.0], np.float32)))
    cond, uncond = conditioner.get_unconditional_conditioning(_batch())
    np.testing.assert_array_equal(crossattn.asnumpy()[0], cond["crossattn"].asnumpy()[0])
    np.testing.assert_array_equal(vector.asnumpy()[0], cond["vector"].asnumpy()[0])
    np.testing.assert_array_equal(crossattn.asnumpy()[1], uncond["crossattn"].asnumpy()[1])
    np.testing.assert_array_equal(vector.asnumpy()[1], uncond["vector"].asnumpy()[1])
    assert [p.name for p in drop_cell.get_parameters()] == [p.name for p in conditioner.get_parameters()]


def test_bad_batches_and_configs_are_rejected(conditioner):
    with pytest.raises(ValueError, match="lacks keys \\['target_size_as_tuple'\\]"):
        conditioner.encode({k: v for k, v in _batch().items() if k != "target_size_as_tuple"})
    with pytest.raises(ValueError, match="differ in size \\(txt 2, .*target_size_as_tuple 3\\)"):
        conditioner.encode({**_batch(), "target_size_as_tuple": np.ones((3, 2))})
    with pytest.raises(ValueError, match="force_uc_zero_embeddings names \\['text'\\]"):
        conditioner.get_unconditional_conditioning(_batch(), force_uc_zero_embeddings=("text",))
    entries = _entries()
    entries[2]["ucg_rate"] = 0.1
    with pytest.raises(ValueError, match="unsupported keys \\['ucg_rate'\\]"):
        GeneralConditioner(entries)
    entries = _entries()
    entries[0]["params"]["layer"] = "pooled"
    with pytest.raises(ValueError, match="layer='pooled' is not supported"):
        instantiate_from_config({"target": entries[0]["target"], "params": entries[0]["params"]})
    with pytest.raises(ValueError, match="exactly \\['crossattn', 'vector'\\]"):
        GeneralConditioner(_entries()[2:])
