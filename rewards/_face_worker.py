"""Face detection with mediapipe's bundled BlazeFace model; numpy + mediapipe only.

Imported in-process when mediapipe is installed next to torch, or run as a script by a
separate interpreter (mediapipe 0.10.21, the last release whose wheel ships the detector,
needs numpy<2 and protobuf<5). Protocol as a script: read an 8-byte little-endian length and
that many bytes of `.npy` (`[B,H,W,3]` uint8) from stdin, answer one JSON list of B floats.
"""
from __future__ import annotations

import io
import json
import struct
import sys

import numpy as np

MODEL_SELECTION = 0  # 0: short-range BlazeFace (faces within ~2 m), 1: full-range
MIN_CONFIDENCE = 0.5  # mediapipe's default; lower values fire on noise


def make_detector(mp_module):
    """The legacy `solutions` face detector; its model is inside the mediapipe wheel."""
    if not hasattr(mp_module, "solutions"):
        raise ImportError(
            f"mediapipe {getattr(mp_module, '__version__', '?')} has no bundled face detector (the legacy "
            "`solutions` API and its models were removed in 0.10.30); use mediapipe==0.10.21"
        )
    return mp_module.solutions.face_detection.FaceDetection(
        model_selection=MODEL_SELECTION, min_detection_confidence=MIN_CONFIDENCE
    )


def face_scores(detector, images: np.ndarray) -> list[float]:
    """`[B,H,W,3]` uint8 -> per image the highest face-detection confidence, 0.0 when none."""
    scores = []
    for image in images:
        result = detector.process(np.ascontiguousarray(image))
        confidences = [float(d.score[0]) for d in (result.detections or [])]
        scores.append(max(confidences, default=0.0))
    return scores


def main() -> None:
    import mediapipe as mp

    detector = make_detector(mp)
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        header = stdin.read(8)
        if len(header) < 8:
            return
        (size,) = struct.unpack("<Q", header)
        images = np.load(io.BytesIO(stdin.read(size)), allow_pickle=False)
        stdout.write(json.dumps(face_scores(detector, images)) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main()
