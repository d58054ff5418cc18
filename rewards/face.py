"""Face quality: the confidence of mediapipe's bundled face detector (BlazeFace), per image.

A proxy for "a well-formed face is present"; prompt-independent and not differentiable.
mediapipe is optional. The last release whose wheel ships the detector model (0.10.21)
needs numpy<2 and protobuf<5, which this project's stack (numpy 2, ray) does not allow in
one environment, so two ways are supported:
- in-process, when `import mediapipe` works (e.g. the reward actor's own Ray runtime env);
- a separate interpreter: `paths={"face_quality_python": "/venv-mp/bin/python"}` (or
  TEXFORCE_FACE_QUALITY_PYTHON) naming a Python with `mediapipe==0.10.21 numpy<2`; images
  go to it over a pipe (`rewards/_face_worker.py`).
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

from rewards import _face_worker
from rewards.files import FileSpec
from rewards.jpeg import to_uint8_hwc

PYTHON = FileSpec(
    "face_quality_python", "file",
    "a Python interpreter with mediapipe==0.10.21 and numpy<2 (in a checkout, `make face-env` builds "
    ".venv-face/bin/python; elsewhere python -m venv /venv-mp && /venv-mp/bin/pip install mediapipe==0.10.21 "
    "'numpy<2'), unless mediapipe imports here",
    optional=True,
)
FILES = (PYTHON,)
INSTALL_HINT = "pip install 'texforce[face]' in an environment that allows numpy<2, or " + PYTHON.what


class _InProcess:
    def __init__(self, detector):
        self.detector = detector

    def __call__(self, images: np.ndarray) -> list[float]:
        return _face_worker.face_scores(self.detector, images)

    def close(self) -> None:
        self.detector.close()


class _Subprocess:
    """A long-lived worker process running `_face_worker.py` under another interpreter."""

    def __init__(self, python: Path):
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [str(python), str(Path(_face_worker.__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env={**os.environ, "PYTHONNOUSERSITE": "1"},
        )

    def __call__(self, images: np.ndarray) -> list[float]:
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
            raise RuntimeError(f"the face_quality worker ({self.proc.args[0]}) died: {tail}")
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


class FaceQuality:
    """`[B,3,H,W]` in [0,1] -> `[B]` highest face-detection confidence in [0,1], 0 when no face."""

    name = "face_quality"
    differentiable = False

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = self.backend(to_uint8_hwc(images))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def close(self) -> None:
        self.backend.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter shutdown
            pass


def build_face_quality(*, paths: Mapping[str, str] | None, device=None, dtype=None) -> FaceQuality:
    given = (paths or {}).get(PYTHON.key) or os.environ.get(PYTHON.env_var)
    if given:
        return FaceQuality(_Subprocess(PYTHON.resolve(paths)))
    try:
        import mediapipe
    except ImportError as err:
        raise ImportError(
            f"face_quality needs mediapipe, which is not importable by {sys.executable} ({err}); "
            + INSTALL_HINT
        ) from err
    try:
        return FaceQuality(_InProcess(_face_worker.make_detector(mediapipe)))
    except ImportError as err:
        raise ImportError(f"{err}; " + INSTALL_HINT) from err
