"""mediapipe's bundled detectors, face (BlazeFace) and palm (the Hands graph's palm detector); numpy and mediapipe only.

Imported in-process when mediapipe is installed next to torch, or run as a script by a
separate interpreter (mediapipe 0.10.21, the last release whose wheel ships the models,
needs numpy<2 and protobuf<5): `python _mediapipe_worker.py face|hand`. Protocol as a script:
read an 8-byte little-endian length and that many bytes of `.npy` (`[B,H,W,3]` uint8) from
stdin, answer one JSON list of B floats.
"""
from __future__ import annotations

import io
import json
import struct
import sys
from dataclasses import dataclass

import numpy as np

DETECTORS = ("face", "hand")
FACE_MODEL_SELECTION = 0  # 0: short-range BlazeFace (faces within ~2 m), 1: full-range
MIN_CONFIDENCE = 0.5  # mediapipe's default for both detectors; lower values fire on noise
# The Hands solution's graph, for static images. Its `palm_detections` stream holds the palm detector's boxes and
# scores, which `mp.solutions.hands.Hands` does not return (it gives landmarks and the left/right classification).
HAND_GRAPH = "mediapipe/modules/hand_landmark/hand_landmark_tracking_cpu.binarypb"


@dataclass
class Detector:
    """A mediapipe graph and the output stream that holds its detections."""

    graph: object  # a mediapipe.python.solution_base.SolutionBase
    stream: str

    def scores(self, images: np.ndarray) -> list[float]:
        """`[B,H,W,3]` uint8 -> per image the highest detection confidence, 0.0 when none (below MIN_CONFIDENCE)."""
        scores = []
        for image in images:
            found = getattr(self.graph.process(np.ascontiguousarray(image)), self.stream)
            scores.append(max((float(d.score[0]) for d in (found or [])), default=0.0))
        return scores

    def close(self) -> None:
        self.graph.close()


def make_detector(mp_module, kind: str) -> Detector:
    """The `solutions` graph for `kind` ("face" or "hand"); its model is inside the mediapipe wheel."""
    if not hasattr(mp_module, "solutions"):
        raise ImportError(
            f"mediapipe {getattr(mp_module, '__version__', '?')} has no bundled detectors (the legacy "
            "`solutions` API and its models were removed in 0.10.30); use mediapipe==0.10.21"
        )
    if kind == "face":
        graph = mp_module.solutions.face_detection.FaceDetection(
            model_selection=FACE_MODEL_SELECTION, min_detection_confidence=MIN_CONFIDENCE
        )
        return Detector(graph, "detections")
    if kind == "hand":
        from mediapipe.python.solution_base import SolutionBase

        graph = SolutionBase(
            binary_graph_path=HAND_GRAPH,
            side_inputs={"model_complexity": 1, "num_hands": 2, "use_prev_landmarks": False},
            calculator_params={"palmdetectioncpu__TensorsToDetectionsCalculator.min_score_thresh": MIN_CONFIDENCE},
            outputs=["palm_detections"],
        )
        return Detector(graph, "palm_detections")
    raise ValueError(f"unknown detector {kind!r}: one of {DETECTORS}")


def main(kind: str) -> None:
    import mediapipe as mp

    detector = make_detector(mp, kind)
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        header = stdin.read(8)
        if len(header) < 8:
            return
        (size,) = struct.unpack("<Q", header)
        images = np.load(io.BytesIO(stdin.read(size)), allow_pickle=False)
        stdout.write(json.dumps(detector.scores(images)) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
