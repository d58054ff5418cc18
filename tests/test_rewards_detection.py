"""face_quality and hand_detection: mediapipe's bundled detectors, in-process or in a separate interpreter."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import rewards
from actors.reward import RewardActor
from rl.config import RewardSettings

HAVE_MEDIAPIPE = importlib.util.find_spec("mediapipe") is not None
WORKER_PYTHON = os.environ.get("TEXFORCE_MEDIAPIPE_PYTHON")
DETECTORS = ["face_quality", "hand_detection"]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def _cartoon_face(size=256) -> torch.Tensor:
    image = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.ellipse((64 * s, 48 * s, 192 * s, 208 * s), fill=(230, 190, 160))
    draw.ellipse((95 * s, 100 * s, 115 * s, 115 * s), fill=(40, 30, 30))
    draw.ellipse((141 * s, 100 * s, 161 * s, 115 * s), fill=(40, 30, 30))
    draw.polygon([(128 * s, 120 * s), (120 * s, 150 * s), (136 * s, 150 * s)], fill=(200, 150, 130))
    draw.arc((100 * s, 150 * s, 156 * s, 180 * s), 20, 160, fill=(150, 40, 40), width=4)
    return _to_tensor(image)


def _cartoon_hand(size=256) -> torch.Tensor:
    """An open hand, palm and four fingers up, thumb out, outlined, on a blue background (mediapipe 0.10.21's
    palm detector: 0.99)."""
    image = Image.new("RGB", (size, size), (60, 90, 140))
    draw = ImageDraw.Draw(image)
    s = 0.6 * size / 256

    def at(x: float, y: float) -> tuple[float, float]:
        return size / 2 + (x - 128) * s, size / 2 + (y - 128) * s

    skin, outline = (225, 180, 150), (120, 80, 60)
    draw.ellipse((*at(80, 115), *at(176, 215)), fill=skin, outline=outline, width=max(1, int(3 * s)))
    for x, length in [(99, 110), (121, 128), (143, 122), (165, 100)]:  # the fingers
        base, tip = at(x, 140), at(x, 140 - length)
        draw.line([base, tip], fill=outline, width=int(22 * s))
        draw.line([base, tip], fill=skin, width=int(16 * s))
        draw.ellipse((tip[0] - 8 * s, tip[1] - 8 * s, tip[0] + 8 * s, tip[1] + 8 * s), fill=skin)
    base, tip = at(95, 175), at(40, 130)  # the thumb
    draw.line([base, tip], fill=outline, width=int(26 * s))
    draw.line([base, tip], fill=skin, width=int(20 * s))
    draw.ellipse((tip[0] - 10 * s, tip[1] - 10 * s, tip[0] + 10 * s, tip[1] + 10 * s), fill=skin)
    draw.rectangle((*at(102, 205), *at(156, 300)), fill=skin)  # the wrist
    return _to_tensor(image.filter(ImageFilter.GaussianBlur(1)))


def _need_a_detector() -> None:
    if not HAVE_MEDIAPIPE and not WORKER_PYTHON:
        reason = ("mediapipe is not importable here (its detector models ship only in mediapipe<=0.10.21, which "
                  "needs numpy<2) and TEXFORCE_MEDIAPIPE_PYTHON names no interpreter that has it (`make "
                  "mediapipe-env` builds one)")
        print(reason)
        pytest.skip(reason)


@pytest.mark.skipif(HAVE_MEDIAPIPE, reason="mediapipe is importable here")
@pytest.mark.parametrize("name", DETECTORS)
def test_missing_mediapipe_says_how_to_install(monkeypatch, name):
    monkeypatch.delenv("TEXFORCE_MEDIAPIPE_PYTHON", raising=False)
    with pytest.raises(ImportError, match=rf"{name} needs mediapipe.*make mediapipe-env.*mediapipe==0.10.21 "):
        rewards.build_reward(name)


@pytest.mark.parametrize("name", DETECTORS)
def test_worker_without_mediapipe_fails_clearly(name):
    if HAVE_MEDIAPIPE:
        pytest.skip("this interpreter has mediapipe, so a worker on it would not fail")
    reward = rewards.build_reward(name, paths={"mediapipe_python": sys.executable})
    try:
        with pytest.raises(RuntimeError, match=r"(?s)mediapipe worker .* died: .*No module named 'mediapipe'"):
            reward(torch.rand(1, 3, 32, 32), [""])
    finally:
        reward.scorers[0].close()


def test_bad_interpreter_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"'mediapipe_python' not found at {tmp_path}/python"):
        rewards.build_reward("hand_detection", paths={"mediapipe_python": str(tmp_path / "python")})


@pytest.mark.parametrize("name, target, other, noise_max", [
    ("face_quality", _cartoon_face, _cartoon_hand, 1.0),  # BlazeFace sees a face in this noise at 0.58
    ("hand_detection", _cartoon_hand, _cartoon_face, 0.5),  # the palm detector none
])
def test_a_detector_scores_its_target_higher_than_noise_grey_and_the_other_detectors_target(name, target, other,
                                                                                           noise_max):
    _need_a_detector()
    reward = rewards.build_reward(name)
    assert not reward.differentiable
    noise = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))
    images = torch.stack([target(), noise, torch.full((3, 256, 256), 0.5), other()])
    try:
        scores = reward(images, ["a picture"] * 4).scores
        assert scores.shape == (4,)
        assert scores[0] > 0.7 and scores[1] < min(scores[0], noise_max) and scores[2] == 0.0 and scores[3] < scores[0]
        # the worker serves repeated calls, each image on its own: no state carried from one image to the next
        # (static images, no tracking)
        alone = torch.cat([reward(images[i:i + 1], ["a picture"]).scores for i in (3, 0)])
        torch.testing.assert_close(alone, scores[[3, 0]], atol=1e-6, rtol=0)
    finally:
        reward.scorers[0].close()


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (one that exited and waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_ray_reward_actor_scores_on_the_detectors_interpreters_which_go_with_the_actor(ray_session):
    """As a run on Ray scores `face_quality:1,hand_detection:1`: the reward actor's process starts one detector
    interpreter per reward. An actor killed (a stopped run, a restart) must not leave them behind: each exits when
    its stdin closes."""
    if not WORKER_PYTHON:
        pytest.skip("TEXFORCE_MEDIAPIPE_PYTHON names no interpreter with mediapipe (`make mediapipe-env` builds one)")
    settings = RewardSettings(spec="face_quality:1,hand_detection:1", paths={"mediapipe_python": WORKER_PYTHON})
    actor = ray_session.remote(RewardActor).options(num_cpus=0).remote(settings, device="cpu")
    images = (torch.stack([_cartoon_face(), _cartoon_hand(), torch.full((3, 256, 256), 0.5)]) * 255).round()
    scored = ray_session.get(actor.score.remote(images.to(torch.uint8), ["a portrait"] * 3), timeout=300)
    face, hand = scored.parts["face_quality"], scored.parts["hand_detection"]
    assert face[0] > 0.7 and hand[1] > 0.7 and face[2] == hand[2] == 0.0
    torch.testing.assert_close(scored.scores, face + hand)
    workers = ray_session.get(actor.__ray_call__.remote(
        lambda self: [scorer.backend.proc.pid for scorer in self.reward.scorers]))
    assert len(workers) == 2 and all(_running(pid) for pid in workers)
    ray_session.kill(actor)
    deadline = time.monotonic() + 120
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "a detector's interpreter outlived its reward actor"
        time.sleep(0.05)
