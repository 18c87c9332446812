"""The evaluation models against transformers (the reference), at small width with random weights
written by the test: CLIP image and text embeddings, DINO ViT class-token embeddings, and the
image preprocessing of CLIPImageProcessor / ViTImageProcessor (PIL backends) on odd sizes and
non-RGB modes. Both from a model folder and from the bare .safetensors file."""

import numpy as np
import pytest
import torch
from PIL import Image
from reference import IMAGENET_MEAN, IMAGENET_STD, write_eval_clip, write_eval_dino

from gm.metrics.preprocess import ImagePreprocessor

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil  # noqa: E402

REL = 1e-4


def _odd_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (301, 257, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (100, 421, 4), dtype=np.uint8), "RGBA"),
            Image.fromarray(rng.integers(0, 256, (47, 46), dtype=np.uint8), "L"),
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P"),
            Image.fromarray(rng.integers(0, 256, (150, 90, 3), dtype=np.uint8)).convert("CMYK")]


@pytest.mark.parametrize("index", range(5))
def test_clip_preprocessing_is_the_image_processors(index):
    image = _odd_images()[index]
    expected = CLIPImageProcessorPil()(images=image, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(ImagePreprocessor.clip()([image])[0], expected)


@pytest.mark.parametrize("index", range(5))
def test_vit_preprocessing_is_the_image_processors(index, tmp_path):
    image = _odd_images()[index]
    if image.mode == "RGB":  # the processor's own defaults (it cannot take other modes without conversion)
        expected = ViTImageProcessorPil()(images=image, return_tensors="np")["pixel_values"][0]
        assert np.array_equal(ImagePreprocessor.vit()([image])[0], expected)
    # dino-vits16's preprocessor_config.json: a plain size, bilinear, ImageNet statistics (+ RGB conversion)
    ViTImageProcessorPil(size=224, resample=2, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                         do_convert_rgb=True).save_pretrained(tmp_path)
    reference = ViTImageProcessorPil.from_pretrained(tmp_path)
    expected = reference(images=image, return_tensors="np")["pixel_values"][0]
    ours = ImagePreprocessor.from_folder(tmp_path, ImagePreprocessor.vit())
    assert np.array_equal(ours([image])[0], expected)


def _images(n):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def _close(ours, theirs):
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= REL * np.max(np.abs(theirs)), np.max(np.abs(ours - theirs))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, write_eval_clip(folder)


def test_clip_image_and_text_embeddings_match_transformers(clip_folder):
    from gm.metrics.encoders import ClipEvaluator

    folder, model = clip_folder
    ours = ClipEvaluator(folder)
    images = _images(3)
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    prompts = ["a photo of sks dog", "a dog in a bucket", "x"]
    ids = torch.tensor(ours.tokenizer(prompts), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    _close(ours.image_embeds(images), out.image_embeds.numpy())
    _close(ours.text_embeds(prompts), out.text_embeds.numpy())
    # the bare weights file: the architecture read off the shapes, the processor's defaults
    bare = ClipEvaluator(folder / "model.safetensors")
    assert bare.preprocess == ImagePreprocessor.clip()
    _close(bare.text_embeds(prompts), out.text_embeds.numpy())


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino")
    return folder, write_eval_dino(folder)


def test_dino_embeddings_match_transformers(dino_folder):
    from gm.metrics.encoders import DinoEvaluator

    folder, model = dino_folder
    images = _images(3)
    pixels = ViTImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    expected = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    _close(DinoEvaluator(folder).image_embeds(images), expected)
    _close(DinoEvaluator(folder / "model.safetensors").model(
        __import__("mindspore").Tensor(pixels.numpy())).asnumpy(), cls)


def test_eval_tool_reports_the_papers_metrics_from_transformers_embeddings(clip_folder, dino_folder, tmp_path):
    """tools/eval_dreambooth.py end to end; expected numbers from the transformers models and plain loops."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import PngImagePlugin

    (clip_path, clip_model), (dino_path, dino_model) = clip_folder, dino_folder
    generated, subject = tmp_path / "generated", tmp_path / "subject"
    generated.mkdir()
    subject.mkdir()
    prompts = ["a sks dog on the beach", "a sks dog on the beach", "a red sks dog"]
    for i, (image, prompt) in enumerate(zip(_images(3), prompts)):
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", prompt)
        image.save(generated / f"{i:05d}.png", pnginfo=info)
    for i, image in enumerate(_odd_images()[:2]):
        image.convert("RGB").save(subject / f"{i}.jpg", quality=95)
    out = tmp_path / "metrics.json"
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "tools/eval_dreambooth.py", "--images", str(generated), "--subject",
                             str(subject), "--clip", str(clip_path), "--dino", str(dino_path), "--json", str(out)],
                            cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(out.read_text())

    gen = [Image.open(p).convert("RGB") for p in sorted(generated.iterdir())]
    real = [Image.open(p) for p in sorted(subject.iterdir())]
    clip_proc = CLIPImageProcessorPil.from_pretrained(clip_path)
    dino_proc = ViTImageProcessorPil.from_pretrained(dino_path)
    from gm.metrics.encoders import ClipEvaluator

    ids = torch.tensor(ClipEvaluator(clip_path).tokenizer(prompts), dtype=torch.long)
    with torch.no_grad():
        def clip_image(images):
            pixels = clip_proc(images=images, return_tensors="pt")["pixel_values"]
            return clip_model(input_ids=ids[:1], pixel_values=pixels).image_embeds.numpy()

        def dino(images):
            pixels = dino_proc(images=images, return_tensors="pt")["pixel_values"]
            return dino_model(pixel_values=pixels).last_hidden_state[:, 0].numpy()

        text = clip_model(input_ids=ids, pixel_values=clip_proc(images=gen[:1], return_tensors="pt")[
            "pixel_values"]).text_embeds.numpy()
        g_clip, r_clip, g_dino, r_dino = clip_image(gen), clip_image(real), dino(gen), dino(real)

    def cos(u, v):
        return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))

    def mean_pairs(a, b):
        return sum(cos(x, y) for x in a for y in b) / (len(a) * len(b))

    assert got["dino"] == pytest.approx(mean_pairs(g_dino, r_dino), abs=1e-4)
    assert got["clip_i"] == pytest.approx(mean_pairs(g_clip, r_clip), abs=1e-4)
    assert got["clip_t"] == pytest.approx(np.mean([cos(g_clip[i], text[i]) for i in range(3)]), abs=1e-4)
    beach = next(row for row in got["per_prompt"] if row["prompt"] == prompts[0])
    assert beach["images"] == 2
    assert beach["dino"] == pytest.approx(mean_pairs(g_dino[:2], r_dino), abs=1e-4)
    assert "overall" in result.stdout and "CLIP-T" in result.stdout


def _reference_shapes(model_class, config):
    with torch.device("meta"):  # names and shapes only, no memory
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def test_full_size_towers_have_the_official_names_and_shapes(tmp_path):
    """clip-vit-large-patch14 and dino-vits16 at full size: every tensor of the published files by name and shape."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from gm.modules.vision import CLIPTextModelWithProjection, CLIPVisionModelWithProjection, DinoViTModel

    clip_config = CLIPConfig(
        text_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072, "max_position_embeddings": 77},
        vision_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                       "intermediate_size": 4096, "image_size": 224, "patch_size": 14}, projection_dim=768)
    expected = _reference_shapes(CLIPModel, clip_config)
    expected.pop("logit_scale")
    ours = {k: tuple(p.shape) for k, p in CLIPVisionModelWithProjection(1024, 24, 16, 4096, 224, 14, 768)
            .parameters_and_names()}
    ours.update({k: tuple(p.shape) for k, p in CLIPTextModelWithProjection(768, 12, 12, 3072, 768)
                 .parameters_and_names()})
    assert ours == expected
    dino_config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                            image_size=224, patch_size=16)
    # transformers 5 renames ViT's modules in memory and writes the published names on save
    torch.manual_seed(0)
    ViTModel(dino_config, add_pooling_layer=False).save_pretrained(tmp_path, safe_serialization=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert "encoder.layer.11.attention.attention.query.weight" in expected
    ours = {k: tuple(p.shape) for k, p in DinoViTModel(384, 12, 6, 1536, 224, 16).parameters_and_names()}
    assert ours == expected
