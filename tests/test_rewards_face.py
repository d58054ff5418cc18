"""face_quality: mediapipe's bundled face detector, in-process or in a separate interpreter."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import rewards
from actors.reward import RewardActor
from rl.config import RewardSettings

HAVE_MEDIAPIPE = importlib.util.find_spec("mediapipe") is not None
WORKER_PYTHON = os.environ.get("TEXFORCE_FACE_QUALITY_PYTHON")


def _cartoon_face(size=256) -> torch.Tensor:
    image = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.ellipse((64 * s, 48 * s, 192 * s, 208 * s), fill=(230, 190, 160))
    draw.ellipse((95 * s, 100 * s, 115 * s, 115 * s), fill=(40, 30, 30))
    draw.ellipse((141 * s, 100 * s, 161 * s, 115 * s), fill=(40, 30, 30))
    draw.polygon([(128 * s, 120 * s), (120 * s, 150 * s), (136 * s, 150 * s)], fill=(200, 150, 130))
    draw.arc((100 * s, 150 * s, 156 * s, 180 * s), 20, 160, fill=(150, 40, 40), width=4)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.skipif(HAVE_MEDIAPIPE, reason="mediapipe is importable here")
def test_missing_mediapipe_says_how_to_install(monkeypatch):
    monkeypatch.delenv("TEXFORCE_FACE_QUALITY_PYTHON", raising=False)
    with pytest.raises(ImportError, match=r"face_quality needs mediapipe.*mediapipe==0.10.21 and numpy<2"):
        rewards.build_reward("face_quality")


def test_worker_without_mediapipe_fails_clearly(monkeypatch):
    if HAVE_MEDIAPIPE:
        pytest.skip("this interpreter has mediapipe, so a worker on it would not fail")
    reward = rewards.build_reward("face_quality", paths={"face_quality_python": sys.executable})
    try:
        with pytest.raises(RuntimeError, match=r"(?s)face_quality worker .* died: .*No module named 'mediapipe'"):
            reward(torch.rand(1, 3, 32, 32), [""])
    finally:
        reward.scorers[0].close()


def test_bad_interpreter_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"'face_quality_python' not found at {tmp_path}/python"):
        rewards.build_reward("face_quality", paths={"face_quality_python": str(tmp_path / "python")})


def test_face_scores_higher_than_noise():
    if not HAVE_MEDIAPIPE and not WORKER_PYTHON:
        reason = ("mediapipe is not importable here (its face model ships only in mediapipe<=0.10.21, which needs "
                  "numpy<2) and TEXFORCE_FACE_QUALITY_PYTHON names no interpreter that has it")
        print(reason)
        pytest.skip(reason)
    reward = rewards.build_reward("face_quality")
    assert not reward.differentiable
    noise = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))
    images = torch.stack([_cartoon_face(), noise, torch.full((3, 256, 256), 0.5)])
    try:
        scores = reward(images, ["a portrait"] * 3).scores
        assert scores.shape == (3,)
        assert scores[0] > 0.7 and scores[0] > scores[1] and scores[2] == 0.0
        again = reward(images[:1], ["a portrait"]).scores  # the worker serves repeated calls
        assert again[0] == pytest.approx(scores[0].item(), abs=1e-6)
    finally:
        reward.scorers[0].close()


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (one that exited and waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_ray_reward_actor_scores_faces_on_the_detectors_interpreter_which_goes_with_the_actor(ray_session):
    """As a run on Ray scores face_quality: the reward actor's process starts the detector's interpreter. An actor
    killed (a stopped run, a restart) must not leave that interpreter behind: it exits when its stdin closes."""
    if not WORKER_PYTHON:
        pytest.skip("TEXFORCE_FACE_QUALITY_PYTHON names no interpreter with mediapipe (`make face-env` builds one)")
    settings = RewardSettings(spec="face_quality", paths={"face_quality_python": WORKER_PYTHON})
    actor = ray_session.remote(RewardActor).options(num_cpus=0).remote(settings, device="cpu")
    images = (torch.stack([_cartoon_face(), torch.full((3, 256, 256), 0.5)]) * 255).round().to(torch.uint8)
    scored = ray_session.get(actor.score.remote(images, ["a portrait"] * 2), timeout=300)
    assert scored.scores[0] > 0.7 and scored.scores[1] == 0.0
    detector = ray_session.get(actor.__ray_call__.remote(lambda self: self.reward.scorers[0].backend.proc.pid))
    assert _running(detector)
    ray_session.kill(actor)
    deadline = time.monotonic() + 120
    while _running(detector):
        assert time.monotonic() < deadline, "the detector's interpreter outlived its reward actor"
        time.sleep(0.05)
