"""DreamBooth data pipeline: decoding, geometry and micro-conditioning, order/sharding/resume, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gm.data.dreambooth import (
    DreamBoothDataset,
    PairSchedule,
    collate,
    count_images,
    list_image_files,
    model_inputs,
    open_rgb,
    validate_instance_folder,
)
from gm.data.toy_subject import BACKGROUNDS, draw_toy_subject, render_toy_photo
from gm.errors import ConfigError

DOG_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dreambooth" / "dog"


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _gradient(height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3): red grows left->right, green top->bottom, so any crop/flip is visible."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([xs, ys, np.full_like(xs, 60)], -1).round().astype(np.uint8)


def _normalized(array: np.ndarray) -> np.ndarray:
    return ((array.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


# ------------------------------------------------------------------------------- decoding


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high: left half red, right half blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored left edge ends up on top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())

    image = np.asarray(open_rgb(path))
    assert image.shape == (40, 20, 3)
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 60  # top: red
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 60  # bottom: blue

    data = DreamBoothDataset(tmp_path, "p", resolution=16, center_crop=True)
    assert data.sample(0)["instance"]["original_size_as_tuple"].tolist() == [40.0, 20.0]


def test_modes_are_converted_to_rgb(tmp_path):
    gray = np.full((8, 8), 77, np.uint8)
    _save(tmp_path / "l.png", gray)
    assert np.asarray(open_rgb(tmp_path / "l.png"))[0, 0].tolist() == [77, 77, 77]

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    palette.save(tmp_path / "p.png")
    assert np.asarray(open_rgb(tmp_path / "p.png"))[0, 0].tolist() == [10, 200, 30]
    palette.save(tmp_path / "p_transparent.png", transparency=1)  # composited over white like RGBA
    assert np.asarray(open_rgb(tmp_path / "p_transparent.png"))[0, 0].tolist() == [255, 255, 255]

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (0, 0, 255, 255)  # opaque blue | fully transparent (black underneath)
    _save(tmp_path / "rgba.png", rgba)
    out = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [0, 0, 255] and out[0, 7].tolist() == [255, 255, 255]  # over white

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # pure red ink
    red = np.asarray(open_rgb(tmp_path / "cmyk.jpg"))[4, 4]
    assert red[0] > 230 and red[1] < 25 and red[2] < 25

    sixteen = np.array([[0, 32768], [65535, 257]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert np.asarray(open_rgb(tmp_path / "i16.png"))[..., 0].tolist() == [[0, 128], [255, 1]]


def test_extensions_any_case_sorted_and_sidecars(tmp_path):
    pixel = np.full((8, 8, 3), 128, np.uint8)
    for name in ("b.JPG", "a.jpeg", "c.png", "d.webp", "e.BMP"):
        Image.fromarray(pixel).save(tmp_path / name, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG",
                                                            "webp": "WEBP", "bmp": "BMP"}[name.split(".")[1].lower()])
    Image.fromarray(pixel).save(tmp_path / "f.gif")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "c.txt").write_text("  a photo of sks dog on the beach \n")
    (tmp_path / "d.txt").write_text("\n")  # empty sidecar: fall back to the prompt
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpeg", "b.JPG", "c.png", "d.webp", "e.BMP"]

    data = DreamBoothDataset(tmp_path, "a photo of sks dog", resolution=8)
    assert [p.name for p in data.instance_paths] == ["a.jpeg", "b.JPG", "c.png", "d.webp", "e.BMP"]
    assert data.instance_prompts == ["a photo of sks dog", "a photo of sks dog", "a photo of sks dog on the beach",
                                     "a photo of sks dog", "a photo of sks dog"]


# ------------------------------------------------------------------------------- geometry


def test_center_crop_micro_conditioning_landscape_and_portrait(tmp_path):
    landscape = _gradient(60, 100)  # (h, w) = (60, 100)
    _save(tmp_path / "wide.png", landscape)
    data = DreamBoothDataset(tmp_path, "p", resolution=32, center_crop=True)
    view = data.sample(0)["instance"]
    # Shorter side 60 -> 32, longer int(32 * 100 / 60) = 53; left = round((53 - 32) / 2) = round(10.5) = 10.
    assert view["original_size_as_tuple"].tolist() == [60, 100]
    assert view["crop_coords_top_left"].tolist() == [0, 10]
    assert view["target_size_as_tuple"].tolist() == [32, 32]
    resized = np.asarray(Image.fromarray(landscape).resize((53, 32), Image.Resampling.LANCZOS))
    np.testing.assert_allclose(view["pixels"], _normalized(resized[:, 10:42]), atol=1e-6)
    assert view["pixels"].dtype == np.float32 and view["pixels"].shape == (3, 32, 32)

    tall = tmp_path / "tall"
    tall.mkdir()
    _save(tall / "tall.png", _gradient(90, 40))
    view = DreamBoothDataset(tall, "p", resolution=20, center_crop=True).sample(0)["instance"]
    # Width 40 -> 20, height int(20 * 90 / 40) = 45; top = round(12.5) = 12.
    assert view["original_size_as_tuple"].tolist() == [90, 40]
    assert view["crop_coords_top_left"].tolist() == [12, 0]


def test_random_crop_coordinates_match_pixels_and_cover_range(tmp_path):
    image = _gradient(60, 100)
    _save(tmp_path / "wide.png", image)
    data = DreamBoothDataset(tmp_path, "p", resolution=32, center_crop=False, seed=3)
    resized = np.asarray(Image.fromarray(image).resize((53, 32), Image.Resampling.LANCZOS))
    lefts = set()
    for position in range(60):
        view = data.sample(position)["instance"]
        top, left = (int(v) for v in view["crop_coords_top_left"])
        assert top == 0 and 0 <= left <= 53 - 32  # (h, w) resized = (32, 53)
        np.testing.assert_allclose(view["pixels"], _normalized(resized[:, left:left + 32]), atol=1e-6)
        assert view["original_size_as_tuple"].tolist() == [60, 100]
        lefts.add(left)
    assert len(lefts) > 12  # uniform over 22 offsets
    # Fixed by the seed and position, whatever object computes it.
    again = DreamBoothDataset(tmp_path, "p", resolution=32, center_crop=False, seed=3)
    assert again.sample(7)["instance"]["crop_coords_top_left"].tolist() == \
        data.sample(7)["instance"]["crop_coords_top_left"].tolist()


def test_flip_mirrors_pixels_and_keeps_crop_coords(tmp_path):
    # (60, 102) -> (32, 54): left = 11 on both sides, so the flipped crop is the mirrored crop.
    _save(tmp_path / "wide.png", _gradient(60, 102))
    data = DreamBoothDataset(tmp_path, "p", resolution=32, center_crop=True, random_flip=True)
    views = [data.sample(p)["instance"] for p in range(16)]
    flipped = [v for v in views if v["flipped"]]
    plain = [v for v in views if not v["flipped"]]
    assert flipped and plain
    np.testing.assert_array_equal(flipped[0]["pixels"], plain[0]["pixels"][:, :, ::-1])
    assert flipped[0]["pixels"][0, 0, 0] > flipped[0]["pixels"][0, 0, -1]  # red now decreases to the right
    assert flipped[0]["crop_coords_top_left"].tolist() == plain[0]["crop_coords_top_left"].tolist() == [0, 11]
    assert not any(DreamBoothDataset(tmp_path, "p", resolution=32, random_flip=False).sample(p)["instance"]["flipped"]
                   for p in range(16))


# ------------------------------------------------------------------------------- order


def test_pairs_repeats_and_class_cycling():
    schedule = PairSchedule(3, repeats=2, num_class_images=4, seed=0)
    assert schedule.pairs_per_epoch == 6
    for epoch in range(3):
        pairs = [schedule.pair(epoch * 6 + i) for i in range(6)]
        assert sorted(p.instance_index for p in pairs) == [0, 0, 1, 1, 2, 2]
        assert all(p.epoch == epoch for p in pairs)
    classes = [schedule.pair(i).class_index for i in range(12)]
    assert sorted(classes[:4]) == sorted(classes[4:8]) == sorted(classes[8:]) == [0, 1, 2, 3]
    assert PairSchedule(3).pair(0).class_index == -1


def test_order_deterministic_per_seed_and_changes_per_epoch():
    a, b, c = PairSchedule(10, repeats=3, seed=5), PairSchedule(10, repeats=3, seed=5), PairSchedule(10, repeats=3)
    np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))


@pytest.mark.parametrize("world_size,batch_size", [(3, 2), (2, 2), (4, 1)])
def test_rank_shards_disjoint_covering_and_distinct(world_size, batch_size):
    schedule = PairSchedule(10, repeats=3, seed=1)  # 30 pairs per epoch
    steps = -(-2 * schedule.pairs_per_epoch // (world_size * batch_size))  # about two epochs
    per_rank = [[q for s in range(steps) for q in schedule.positions(s, batch_size, r, world_size)]
                for r in range(world_size)]
    everything = sorted(q for rank in per_rank for q in rank)
    assert everything == list(range(steps * world_size * batch_size))  # disjoint and covering
    first_epoch = [[schedule.pair(q).instance_index for q in rank if q < 30] for rank in per_rank]
    assert sorted(i for rank in first_epoch for i in rank) == sorted(list(range(10)) * 3)
    assert len({tuple(rank[:5]) for rank in first_epoch}) == world_size  # each rank its own order


def test_global_batch_independent_of_split():
    schedule = PairSchedule(7, seed=2)
    for step in range(5):
        single = list(schedule.positions(step, 4, 0, 1))
        split = [q for r in range(2) for q in schedule.positions(step, 2, r, 2)]
        assert single == split


# ------------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def toy_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    draw_toy_subject(root / "instance", num_images=3, size=48, captions=True)
    classes = root / "class"
    classes.mkdir()
    for i in range(5):
        _save(classes / f"{i:03d}.png", np.full((40, 56, 3), 40 * i, np.uint8))
    (classes / "002.txt").write_text("a photo of a grey toy")
    return root


def test_batches_with_and_without_prior_preservation(toy_folders):
    data = DreamBoothDataset(toy_folders / "instance", "a photo of a sks toy", class_dir=toy_folders / "class",
                             class_prompt="a photo of a toy", resolution=32, repeats=2, random_flip=True)
    assert len(data) == 6 and data.with_prior_preservation
    batch = data.batch(0, batch_size=4)
    assert batch["instance_pixels"].shape == batch["class_pixels"].shape == (4, 3, 32, 32)
    assert batch["instance_pixels"].dtype == np.float32
    assert -1.0 <= batch["instance_pixels"].min() and batch["instance_pixels"].max() <= 1.0
    assert all(p.startswith("a photo of a sks toy on a ") for p in batch["instance_prompts"])  # sidecars
    for kind in ("instance", "class"):
        for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            assert batch[f"{kind}_{key}"].shape == (4, 2) and batch[f"{kind}_{key}"].dtype == np.float32
    assert batch["instance_original_size_as_tuple"].tolist() == [[48, 48]] * 4
    # Class micro-conditioning comes from the class image itself: (40, 56) -> (32, 44).
    assert batch["class_original_size_as_tuple"].tolist() == [[40, 56]] * 4
    assert all(0 <= left <= 12 and top == 0 for top, left in batch["class_crop_coords_top_left"].tolist())
    for index, prompt in zip(batch["class_indices"], batch["class_prompts"]):
        assert prompt == ("a photo of a grey toy" if index == 2 else "a photo of a toy")

    pixels, cond = model_inputs(batch)
    assert pixels.shape == (8, 3, 32, 32) and len(cond["txt"]) == 8 and cond["crop_coords_top_left"].shape == (8, 2)
    np.testing.assert_array_equal(pixels[4:], batch["class_pixels"])

    alone = DreamBoothDataset(toy_folders / "instance", "p", resolution=32).batch(0, batch_size=2)
    assert not any(key.startswith("class_") for key in alone)
    assert model_inputs(alone)[0].shape == (2, 3, 32, 32)
    with pytest.raises(ConfigError, match="--class_prompt"):
        DreamBoothDataset(toy_folders / "instance", "p", class_dir=toy_folders / "class", resolution=32)


def test_resume_from_step_gives_the_same_batches(toy_folders):
    def make():
        return DreamBoothDataset(toy_folders / "instance", "p", class_dir=toy_folders / "class", class_prompt="c",
                                 resolution=32, repeats=2, random_flip=True, seed=9)

    stream = make().batches(2, rank=1, world_size=2)
    full = [next(stream) for _ in range(6)]
    resumed = make().batches(2, rank=1, world_size=2, start_step=3)
    for expected in full[3:]:
        got = next(resumed)
        for key in ("positions", "instance_indices", "class_indices", "instance_pixels", "class_pixels",
                    "instance_crop_coords_top_left"):
            np.testing.assert_array_equal(got[key], expected[key])
        assert got["instance_prompts"] == expected["instance_prompts"]
    assert collate([make().sample(int(q)) for q in full[4]["positions"]])["positions"].tolist() == \
        full[4]["positions"].tolist()


# ------------------------------------------------------------------------------- errors


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="--instance_data_path .*nope.*does not exist"):
        validate_instance_folder(missing)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        validate_instance_folder(tmp_path / "file.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"{empty}: folder is empty"):
        validate_instance_folder(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("a caption")
    (bad / "b.jpg").write_bytes(b"not a jpeg")
    good = np.asarray(Image.new("RGB", (16, 16), (9, 9, 9)))
    _save(bad / "c.jpg", good)
    (bad / "c.jpg").write_bytes((bad / "c.jpg").read_bytes()[:200])  # truncated
    with pytest.raises(ConfigError) as err:
        validate_instance_folder(bad)
    message = str(err.value)
    assert str(bad) in message and "3 files" in message and "2 image files failed to decode" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="--instance_data_path .*bad"):
        DreamBoothDataset(bad, "p", resolution=8)
    good_dir = tmp_path / "ok"
    good_dir.mkdir()
    _save(good_dir / "x.png", np.full((8, 8, 3), 5, np.uint8))
    with pytest.raises(ConfigError, match="--class_data_path .*nope.*does not exist"):
        DreamBoothDataset(good_dir, "p", class_dir=missing, class_prompt="c", resolution=8)


def test_corrupt_images_among_good_ones_are_skipped_with_a_warning(tmp_path, caplog):
    _save(tmp_path / "a.png", np.full((8, 8, 3), 5, np.uint8))
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    _save(tmp_path / "c.png", np.full((8, 8, 3), 9, np.uint8))
    (tmp_path / "c.txt").write_text("caption")
    with caplog.at_level(logging.WARNING, logger="gm.data.dreambooth"):
        assert [p.name for p in validate_instance_folder(tmp_path)] == ["a.png", "c.png"]
        data = DreamBoothDataset(tmp_path, "p", resolution=8)
    assert "b.jpg" in caplog.text
    assert [p.name for p in data.instance_paths] == ["a.png", "c.png"]
    assert count_images(tmp_path) == 2
    assert count_images(tmp_path / "missing") == 0


# ------------------------------------------------------------------------------- toy subject and real photos


def test_toy_subject_is_deterministic_and_varied(tmp_path):
    first, kind = render_toy_photo(1, size=64, seed=0)
    again, _ = render_toy_photo(1, size=64, seed=0)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert kind == BACKGROUNDS[1] and first.size == (64, 64)
    other, _ = render_toy_photo(1, size=64, seed=1)
    assert np.abs(np.asarray(other, np.int16) - np.asarray(first, np.int16)).mean() > 3

    paths = draw_toy_subject(tmp_path, num_images=5, size=64)
    assert [p.name for p in paths] == [f"toy_{i:02d}.jpg" for i in range(5)]
    photos = [np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths]
    for i in range(5):
        for j in range(i):
            assert np.abs(photos[i] - photos[j]).mean() > 10
        # The subject's stripes are there: strongly red and strongly yellow pixels in every photo.
        r, g, b = photos[i][..., 0], photos[i][..., 1], photos[i][..., 2]
        assert ((r > 150) & (g < 80) & (b < 80)).sum() > 10
        assert ((r > 180) & (g > 140) & (b < 90)).sum() > 10
    with pytest.raises(ConfigError, match="--num_images"):
        draw_toy_subject(tmp_path, num_images=0)


def test_real_dog_photos_load():
    if not DOG_DIR.is_dir():
        pytest.skip(f"real DreamBooth photos not found at {DOG_DIR} (the shared data folder beside the checkout)")
    paths = validate_instance_folder(DOG_DIR)
    assert len(paths) == 5
    data = DreamBoothDataset(DOG_DIR, "a photo of sks dog", resolution=64, center_crop=True)
    batch = data.batch(0, batch_size=5)
    assert batch["instance_pixels"].shape == (5, 3, 64, 64)
    assert sorted(batch["instance_indices"].tolist()) == [0, 1, 2, 3, 4]
    sizes = {tuple(open_rgb(p).size[::-1]) for p in paths}
    assert {tuple(s) for s in batch["instance_original_size_as_tuple"].astype(int).tolist()} == sizes
    assert batch["instance_pixels"].std() > 0.1 and -1 <= batch["instance_pixels"].min()
