"""Detection rewards: the confidence of one of mediapipe's bundled detectors, per image.

- `face_quality`: BlazeFace's highest face-detection confidence, a proxy for "a well-formed face is present".
- `hand_detection`: the Hands graph's highest palm-detection confidence, TexForce's hand reward (its code scores a
  hand detector's highest confidence, there a YOLO; the palm detector is the one mediapipe ships).

Prompt-independent and not differentiable. mediapipe is optional. The last release whose wheel
ships the detector models (0.10.21) needs numpy<2 and protobuf<5, which this project's stack
(numpy 2, ray) does not allow in one environment, so two ways are supported:
- in-process, when `import mediapipe` works (e.g. the reward actor's own Ray runtime env);
- a separate interpreter: `paths={"mediapipe_python": ".venv-mediapipe/bin/python"}` (or
  TEXFORCE_MEDIAPIPE_PYTHON) naming a Python with `mediapipe==0.10.21 numpy<2` (`make mediapipe-env`
  builds one); images go to it over a pipe (`rewards/_mediapipe_worker.py`), one process per reward.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rewards import _mediapipe_worker
from rewards.files import FileSpec
from rewards.jpeg import to_uint8_hwc

PYTHON = FileSpec(
    "mediapipe_python", "file",
    "a Python interpreter with mediapipe==0.10.21 and numpy<2 (in a checkout, `make mediapipe-env` builds "
    ".venv-mediapipe/bin/python; elsewhere python -m venv /venv-mp && /venv-mp/bin/pip install mediapipe==0.10.21 "
    "'numpy<2'), unless mediapipe imports here",
    optional=True,
)
FILES = (PYTHON,)
INSTALL_HINT = "pip install 'texforce[mediapipe]' in an environment that allows numpy<2, or " + PYTHON.what


class _Subprocess:
    """A long-lived worker process running `_mediapipe_worker.py KIND` under another interpreter."""

    def __init__(self, python: Path, kind: str):
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [str(python), str(Path(_mediapipe_worker.__file__).resolve()), kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env={**os.environ, "PYTHONNOUSERSITE": "1"},
        )

    def scores(self, images: np.ndarray) -> list[float]:
        buffer = io.BytesIO()
        np.save(buffer, images, allow_pickle=False)
        payload = buffer.getvalue()
        try:
            self.proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the mediapipe worker ({self.proc.args[0]}) died: {tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class DetectionConfidence:
    """`[B,3,H,W]` in [0,1] -> `[B]` the detector's highest confidence in [0,1], 0 when it finds nothing."""

    differentiable = False

    def __init__(self, name: str, backend):
        self.name = name
        self.backend = backend  # a _mediapipe_worker.Detector in this process, or a _Subprocess

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = self.backend.scores(to_uint8_hwc(images))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def close(self) -> None:
        self.backend.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter shutdown
            pass


def _build(name: str, kind: str, paths: Mapping[str, str] | None) -> DetectionConfidence:
    if PYTHON.is_given(paths):
        return DetectionConfidence(name, _Subprocess(PYTHON.resolve(paths), kind))
    try:
        import mediapipe
    except ImportError as err:
        raise ImportError(
            f"{name} needs mediapipe, which is not importable by {sys.executable} ({err}); " + INSTALL_HINT
        ) from err
    try:
        return DetectionConfidence(name, _mediapipe_worker.make_detector(mediapipe, kind))
    except ImportError as err:
        raise ImportError(f"{err}; " + INSTALL_HINT) from err


def build_face_quality(*, paths: Mapping[str, str] | None, device=None, dtype=None) -> DetectionConfidence:
    return _build("face_quality", "face", paths)


def build_hand_detection(*, paths: Mapping[str, str] | None, device=None, dtype=None) -> DetectionConfidence:
    return _build("hand_detection", "hand", paths)
