"""tools/pretrain_toy_world.py at toy scale (PyNative, a few steps of each stage): it writes an
official-layout fp16 single file that loads into the tiny model, a judge and a model card; a
rerun resumes instead of retraining, and one with another step count on the decaying learning rate
is refused; a warm restart (--unet_refine_steps) trains the finished UNet on."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "inference" / "sd_xl_tiny.yaml"
SMALL = ["--ms_mode", "1", "--num_images", "8", "--vae_steps", "2", "--set", "data.heldout_images=4",
         "vae.batch_size=2", "vae.lr_scheduler=cosine", "unet.batch_size=2", "save.state_every=2", "save.log_every=1",
         "judge.photos_per_label=12", "judge.test_photos_per_label=4", "judge.epochs=2",
         "quality.images_per_class=2", "quality.batch_size=2", "quality.num_steps=2"]


def _pretrain(out, unet_steps):
    return subprocess.run([sys.executable, "tools/pretrain_toy_world.py", "--out", str(out), *SMALL,
                           "--unet_steps", str(unet_steps)], cwd=REPO, capture_output=True, text=True, timeout=1500)


def _tensors(path, prefix=""):
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_world")
    result = _pretrain(out, 3)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_the_result_is_an_official_single_file_of_the_tiny_model(pretrained):
    from gm.checkpoint.load import engine_state, load_weights
    from gm.models.diffusion import build_engine

    engine = build_engine(TINY)
    expected = {k: v.shape for k, v in engine_state(engine).items()}
    written = _tensors(pretrained / "sd_xl_toy_world.safetensors")
    assert {k: v.shape for k, v in written.items()} == expected
    assert {v.dtype for v in written.values()} == {np.dtype(np.float16)}
    load_weights(engine, pretrained / "sd_xl_toy_world.safetensors")
    loaded = engine_state(engine)
    name = "model.diffusion_model.out.2.weight"
    assert np.array_equal(loaded[name].astype(np.float16), written[name])
    card = (pretrained / "MODEL_CARD.md").read_text()
    for text in ("| vae | 2 |", "| unet | 3 |", "held-out (4 photos)", "Base model quality", "| mean |",
                 f"python tools/pretrain_toy_world.py --out {pretrained}"):
        assert text in card, text
    assert (pretrained / "toy_world_judge.safetensors").is_file() and (pretrained / "base_samples.png").is_file()
    assert (pretrained / "unet" / "vae_moments.npz").is_file()  # a resumed UNet stage does not re-encode
    # the VAE follows vae.lr_scheduler (cosine in SMALL, no warmup; over 2 steps: 1, then 0.5)
    scales = [json.loads(line)["lr_scale"] for line in (pretrained / "vae" / "log.jsonl").read_text().splitlines()]
    assert scales == [1.0, 0.5], scales


def test_a_rerun_resumes_and_a_changed_schedule_is_refused(pretrained):
    result = _pretrain(pretrained, 3)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "vae: trained and rescaled weights from" in result.stderr
    assert "unet: resuming from" in result.stderr and "step_000003" in result.stderr
    state_file = pretrained / "unet" / "state" / "step_000003" / "train_state.safetensors"
    state = _tensors(state_file, "model.diffusion_model.")
    shipped = _tensors(pretrained / "sd_xl_toy_world.safetensors", "model.diffusion_model.")
    assert state.keys() == shipped.keys()
    assert all(np.array_equal(state[k].astype(np.float16), shipped[k]) for k in state)
    # the cosine rate of the saved states was planned for 3 steps: step 2 of it is no 2-step run
    refused = _pretrain(pretrained, 2)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert "unet.steps=3" in last and "start a new --out" in last and "Traceback" not in refused.stderr


def test_a_rerun_with_other_stage_settings_is_refused(pretrained):
    # Adam's moments and the schedule of the saved states belong to their own learning rate
    result = subprocess.run([sys.executable, "tools/pretrain_toy_world.py", "--out", str(pretrained), *SMALL,
                             "unet.learning_rate=0.001", "--unet_steps", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "unet.learning_rate=0.0008" in last and "not learning_rate=0.001" in last, last
    assert "start a new --out" in last and "Traceback" not in result.stderr


def test_frozen_text_encoders_train_the_unet_only(pretrained, tmp_path):
    # unet.train_text_encoders=false: the conditioning is computed once per caption and only the
    # UNet is in the saved state (the default run trains both text encoders with it)
    result = subprocess.run([sys.executable, "tools/pretrain_toy_world.py", "--out", str(tmp_path), *SMALL,
                             "unet.train_text_encoders=false", "--unet_steps", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    frozen = _tensors(tmp_path / "unet" / "state" / "step_000002" / "train_state.safetensors")
    trained = _tensors(pretrained / "unet" / "state" / "step_000003" / "train_state.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in frozen)
    assert not any(k.startswith("conditioner.") for k in frozen)
    assert any(k.startswith("conditioner.") for k in trained)
    assert (tmp_path / "sd_xl_toy_world.safetensors").is_file()

def test_the_vae_and_judge_of_an_earlier_base_skip_their_stages(pretrained, tmp_path):
    # --vae_from/--judge_from: a new UNet recipe on the VAE (and the judge that reads through it)
    # of an earlier base, without the VAE stage
    base, judge = pretrained / "sd_xl_toy_world.safetensors", pretrained / "toy_world_judge.safetensors"
    result = subprocess.run([sys.executable, "tools/pretrain_toy_world.py", "--out", str(tmp_path), *SMALL,
                             "data.caption_omit_rate=0.5", "--unet_steps", "2", "--vae_from", str(base),
                             "--judge_from", str(judge)],
                            cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "vae: the VAE of" in result.stderr and "latent space rescaled" not in result.stderr
    vae_before = _tensors(base, "first_stage_model.")
    vae_after = _tensors(tmp_path / "sd_xl_toy_world.safetensors", "first_stage_model.")
    assert vae_before.keys() == vae_after.keys()
    assert all(np.array_equal(vae_before[k], vae_after[k]) for k in vae_before)
    assert (tmp_path / "toy_world_judge.safetensors").read_bytes() == judge.read_bytes()
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert f"| vae | taken from `{base}` (`--vae_from`) | - | held-out (4 photos)" in card
    assert f"taken from `{judge}` (`--judge_from`)" in card
    # the world's captions name colour, pattern and scene only some of the time (data.caption_omit_rate)
    captions = [str(c) for c in np.load(tmp_path / "world_0_12_64_omit50.npz")["captions"]]
    assert any(c.count(" ") < 6 for c in captions) and any(" on a " in c for c in captions)
    missing = subprocess.run([sys.executable, "tools/pretrain_toy_world.py", "--out", str(tmp_path / "x"),
                              "--vae_from", str(tmp_path / "nothing.safetensors")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "--vae_from" in missing.stderr.strip().splitlines()[-1] and "no such file" in missing.stderr


def test_a_warm_restart_trains_the_finished_unet_on(pretrained):
    # runs last: it rewrites the folder's single file with the restarted UNet
    before = _tensors(pretrained / "unet" / "state" / "step_000003" / "train_state.safetensors",
                      "model.diffusion_model.")
    result = subprocess.run([sys.executable, "tools/pretrain_toy_world.py", "--out", str(pretrained), *SMALL,
                             "--unet_steps", "3", "--unet_refine_steps", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "unet: resuming from" in result.stderr and "step_000003" in result.stderr
    refined = _tensors(pretrained / "unet_refine" / "state" / "step_000002" / "train_state.safetensors",
                       "model.diffusion_model.")
    shipped = _tensors(pretrained / "sd_xl_toy_world.safetensors", "model.diffusion_model.")
    assert refined.keys() == before.keys() == shipped.keys()
    assert all(np.array_equal(refined[k].astype(np.float16), shipped[k]) for k in refined)
    assert any(not np.array_equal(refined[k], before[k]) for k in refined)
    card = (pretrained / "MODEL_CARD.md").read_text()
    assert "| unet | 3 |" in card and "| unet_refine | 2 | " in card and "warm restart" in card
    assert "--unet_refine_steps 2" in card
