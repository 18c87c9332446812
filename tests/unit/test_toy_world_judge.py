"""The toy world's judge (gm.metrics.toy_world) and the paper-style set metrics it feeds."""

import itertools
import math

import numpy as np
import pytest

from gm.errors import ConfigError
from gm.metrics.similarity import mean_cross_cosine, mean_pairwise_cosine
from gm.metrics.toy_world import HEADS, LABELS, ToyWorldJudge, judge_photos

# A small judge (150 photos per label, 20 epochs; ~17 s). Measured on held-out photos of another
# seed (2026-12-01): label accuracy 0.65 (chance 0.2); subject fidelity of subject photos 0.73 vs
# 0.42 for other toys; diversity 0.27 among subject photos vs 0.54 among toys. The bounds below
# keep about half of each margin.
MIN_LABEL_ACCURACY = 0.45
MIN_FIDELITY_GAP = 0.15
MIN_DIVERSITY_GAP = 0.12


def _cosine(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def test_set_similarities_are_the_paper_means_over_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    cross = [_cosine(u, v) for u in a.tolist() for v in b.tolist()]
    assert mean_cross_cosine(a, b) == pytest.approx(sum(cross) / len(cross), rel=1e-12)
    pairs = [_cosine(a[i].tolist(), a[j].tolist()) for i, j in itertools.permutations(range(4), 2)]
    assert mean_pairwise_cosine(a) == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)
    assert mean_cross_cosine(a[:1], a[:1]) == pytest.approx(1.0)  # one image against itself
    assert mean_pairwise_cosine(np.stack([a[0], 3 * a[0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(a[:1])


@pytest.fixture(scope="module")
def judged():
    images, targets = judge_photos(150, seed=11)
    test_images, test_targets = judge_photos(40, seed=12)
    return ToyWorldJudge.fit(images, targets, epochs=20, seed=0), test_images, test_targets


def test_judge_photos_follow_the_world_resolution():
    # a 128-pixel world's VAE must round-trip the judge's photos at 128: the same items, drawn larger
    small, small_targets = judge_photos(2, seed=5)
    large, large_targets = judge_photos(2, seed=5, size=128)
    assert small.shape == (len(small_targets), 64, 64, 3) and large.shape == (len(small_targets), 128, 128, 3)
    np.testing.assert_array_equal(large_targets, small_targets)


def test_judge_reads_held_out_photos(judged):
    judge, images, targets = judged
    accuracy = np.mean(judge.predict(images) == np.array(LABELS)[targets[:, 0]])
    assert accuracy > MIN_LABEL_ACCURACY
    embeddings = judge.embed(images)
    assert embeddings.shape == (len(images), sum(len(names) for names in HEADS.values()))
    # each head's part is a probability distribution
    start = 0
    for names in HEADS.values():
        assert np.allclose(embeddings[:, start:start + len(names)].sum(axis=1), 1.0, atol=1e-5)
        start += len(names)


def test_subject_fidelity_and_diversity_separate_the_subject_from_other_toys(judged):
    judge, images, targets = judged
    subject = images[targets[:, 0] == LABELS.index("subject")]
    toys = images[targets[:, 0] == LABELS.index("toy")]
    real, generated_like = subject[20:], subject[:20]
    assert judge.subject_fidelity(generated_like, real) > judge.subject_fidelity(toys, real) + MIN_FIDELITY_GAP
    assert judge.diversity(toys) > judge.diversity(subject) + MIN_DIVERSITY_GAP
    report = judge.report(generated_like, real, toys, "toy")
    assert report["subject_fidelity"] == pytest.approx(judge.subject_fidelity(generated_like, real))
    assert report["real_subject_fidelity"] == pytest.approx(mean_pairwise_cosine(judge.embed(real)))
    assert report["class_as_subject"] < report["subject_recognised"]


def test_judge_file_round_trip_and_a_foreign_file_is_refused(judged, tmp_path):
    judge, images, _ = judged
    path = tmp_path / "judge.safetensors"
    judge.save(path)
    assert np.array_equal(ToyWorldJudge.load(path).embed(images[:8]), judge.embed(images[:8]))
    from safetensors.numpy import save_file

    save_file({"w1": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"), metadata={"heads": "x"})
    with pytest.raises(ConfigError, match="a judge for 'x'"):
        ToyWorldJudge.load(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="no toy-world judge"):
        ToyWorldJudge.load(tmp_path / "missing.safetensors")


def test_judge_takes_pil_images_of_any_size(judged):
    from PIL import Image

    judge, images, _ = judged
    big = [Image.fromarray(image).resize((128, 128), Image.Resampling.BICUBIC) for image in images[:4]]
    assert judge.embed(big).shape == judge.embed(images[:4]).shape
