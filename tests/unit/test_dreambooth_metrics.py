"""The DreamBooth paper's metrics from embeddings (against plain loops) and its prompt file."""

from pathlib import Path

import numpy as np
import pytest

from gm.errors import ConfigError
from gm.metrics.dreambooth import clip_score, dreambooth_metrics, read_prompt_file

PROMPTS_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambooth" / "prompts_and_classes.txt"


def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_metrics_are_means_over_all_pairs_and_per_prompt():
    rng = np.random.default_rng(0)
    gen_dino, real_dino = rng.standard_normal((4, 5)), rng.standard_normal((3, 5))
    gen_clip, real_clip, text = rng.standard_normal((4, 6)), rng.standard_normal((3, 6)), rng.standard_normal((4, 6))
    prompts = ["a", "b", "a", "a"]
    got = dreambooth_metrics(prompts, gen_dino, real_dino, gen_clip, real_clip, text)
    assert got["dino"] == pytest.approx(np.mean([_cos(g, r) for g in gen_dino for r in real_dino]))
    assert got["clip_i"] == pytest.approx(np.mean([_cos(g, r) for g in gen_clip for r in real_clip]))
    assert got["clip_t"] == pytest.approx(np.mean([_cos(gen_clip[i], text[i]) for i in range(4)]))
    rows = {row["prompt"]: row for row in got["per_prompt"]}
    assert [row["prompt"] for row in got["per_prompt"]] == ["a", "b"] and rows["a"]["images"] == 3
    assert rows["b"]["dino"] == pytest.approx(np.mean([_cos(gen_dino[1], r) for r in real_dino]))
    assert rows["a"]["clip_t"] == pytest.approx(np.mean([_cos(gen_clip[i], text[i]) for i in (0, 2, 3)]))
    # one image against itself: 1
    one = dreambooth_metrics(["x"], gen_dino[:1], gen_dino[:1], gen_clip[:1], 2 * gen_clip[:1], gen_clip[:1])
    assert one["dino"] == pytest.approx(1.0) and one["clip_i"] == pytest.approx(1.0)
    assert one["clip_t"] == pytest.approx(1.0)
    only_clip = dreambooth_metrics(prompts, None, None, gen_clip, real_clip, text)
    assert only_clip["dino"] is None and only_clip["clip_i"] == got["clip_i"]


def test_clip_score_is_torchmetrics_definition():
    image = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])  # cos 1, 0.7071, -1 (clamped to 0)
    assert clip_score(image, text) == pytest.approx((100 + 100 / np.sqrt(2) + 0) / 3)


def test_the_papers_prompt_file():
    if not PROMPTS_FILE.is_file():
        pytest.skip(f"{PROMPTS_FILE} not found (../shared beside the checkout)")
    parsed = read_prompt_file(PROMPTS_FILE)
    assert len(parsed.classes) == 30 and parsed.classes["dog6"] == "dog"
    assert parsed.classes["bear_plushie"] == "stuffed animal"
    assert len(parsed.object_prompts) == 25 and len(parsed.live_prompts) == 25
    dog = parsed.prompts("sks", "dog")
    assert dog[0] == "a sks dog in the jungle" and "a sks dog wearing a red hat" in dog
    backpack = parsed.prompts("sks", "backpack")
    assert "a sks backpack on top of a mirror" in backpack and "a sks backpack wearing a red hat" not in backpack


def test_a_plain_prompt_file_and_a_missing_one(tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("a {0} {1} on a beach\n\na photo of {0} {1}\n")
    assert read_prompt_file(plain).prompts("sks", "toy") == ["a sks toy on a beach", "a photo of sks toy"]
    with pytest.raises(ConfigError, match="no such file"):
        read_prompt_file(tmp_path / "none.txt")
