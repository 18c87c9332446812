"""DreamBooth working, seen by the toy world's judge: the README's main command on the shipped base
(gm/pretrained/), with prior preservation and without. The subject-prompt images move from the base
model's subject fidelity toward the instance photos' own; with the prior, the class-prompt images
keep their diversity and do not turn into the subject. Margins from measured runs (below)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# TODO(next session): measured values of the README's main command, then margins of about half
MIN_FIDELITY_GAIN = None
MIN_DIVERSITY_KEPT = None


def _main_command(root: Path, with_prior: bool) -> dict:
    subject = root / "toy_subject"
    if not subject.is_dir():
        subprocess.run([sys.executable, "tools/draw_toy_subject.py", "--out", str(subject)], cwd=REPO, check=True,
                       capture_output=True)
    save = root / ("with_prior" if with_prior else "without_prior")
    args = ["train_dreambooth.py", "--instance_data_path", str(subject), "--instance_prompt", "a photo of sks toy",
            "--save_path", str(save)]
    if with_prior:
        args += ["--class_data_path", str(root / "class_toy"), "--class_prompt", "a photo of a toy"]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((save / "summary.json").read_text())["evaluation"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_world_dreambooth")
    return _main_command(root, True), _main_command(root, False)


def test_the_subject_is_learned(runs):
    prior, _ = runs
    before, after = prior["before"], prior["after"]
    assert after["subject_fidelity"] - before["subject_fidelity"] > MIN_FIDELITY_GAIN


def test_prior_preservation_keeps_the_class(runs):
    prior, no_prior = runs
    assert prior["after"]["class_diversity"] - no_prior["after"]["class_diversity"] > MIN_DIVERSITY_KEPT
