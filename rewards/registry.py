"""The one registry of rewards: name -> how to build it, whether it is differentiable,
which files it needs. A duplicate name is an error; an unknown name lists the valid ones.

Builders import their heavy dependencies (transformers, mediapipe) only when called, so
`import rewards` stays cheap and never imports Ray.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from rewards import aesthetic, clip_models, color, detection, hps, imagereward, jpeg, objects
from rewards.base import (
    Reward,
    RewardDependencyError,
    RewardError,
    RewardFileError,
    RewardSpecError,
    Scorer,
)
from rewards.files import FileSpec

Builder = Callable[..., Scorer]  # builder(*, paths, device, dtype) -> Scorer


@dataclass(frozen=True)
class RewardEntry:
    """One registered reward.

    name: the name used in specs and as the part's key in `RewardOutput.parts`.
    build: `build(*, paths, device, dtype) -> Scorer`.
    differentiable: whether gradients reach the input images.
    files: the files it loads (their `paths` keys); empty for weight-free rewards.
    description: one line for `texforce rewards list`.
    """

    name: str
    build: Builder
    differentiable: bool
    files: tuple[FileSpec, ...]
    description: str


_REGISTRY: dict[str, RewardEntry] = {}


def register(entry: RewardEntry) -> None:
    """Add a reward; registering a name twice is an error."""
    if entry.name in _REGISTRY:
        raise ValueError(f"reward {entry.name!r} is already registered")
    if not entry.name.replace("_", "").isalnum():
        raise ValueError(f"reward name {entry.name!r} must be letters, digits and underscores")
    _REGISTRY[entry.name] = entry


def get_entry(name: str) -> RewardEntry:
    """The entry named `name`; an unknown name is a RewardSpecError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RewardSpecError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}") from None


def list_entries() -> list[RewardEntry]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """`"imagereward:1.0,aesthetic:0.5"` -> `[("imagereward", 1.0), ("aesthetic", 0.5)]`; a bare name weighs 1.

    An unknown name, a missing, non-numeric or non-finite weight, or a repeated name is a RewardSpecError.
    """
    example = "write e.g. 'imagereward:1.0,aesthetic:0.5'"
    parts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise RewardSpecError(f"empty reward in spec {spec!r}; {example}")
        name, sep, weight = item.partition(":")
        name = name.strip()
        if not name:
            raise RewardSpecError(f"{item!r} in spec {spec!r} names no reward; {example}")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise RewardSpecError(
                f"weight {weight!r} of {name!r} in spec {spec!r} is not a number; {example}"
            ) from None
        if not math.isfinite(value):
            raise RewardSpecError(f"weight {weight.strip()!r} of {name!r} in spec {spec!r} must be a finite number")
        get_entry(name)
        if name in (n for n, _ in parts):
            raise RewardSpecError(f"reward {name!r} appears twice in spec {spec!r}")
        parts.append((name, value))
    return parts


def check_reward(spec: str, *, paths: Mapping[str, str] | None = None) -> list[tuple[str, float]]:
    """Parse `spec` and find every model file its rewards need, loading nothing: what a run
    checks before it starts. Raises RewardSpecError or RewardFileError; returns the parsed spec. The keys of
    `paths` are `check_path_keys`'s to check: a run's paths may serve several specs."""
    parsed = parse_spec(spec)
    for name, _ in parsed:
        for file in get_entry(name).files:
            if file.optional and not file.is_given(paths):
                continue
            try:
                file.resolve(paths)
            except RewardFileError as error:
                raise RewardFileError(f"reward {name!r}: {error}") from None
    return parsed


def check_path_keys(paths: Mapping[str, str], specs: list[str] | None) -> None:
    """Raise RewardError for the first key of `paths` that no reward of `specs` reads (None: no reward at all),
    naming the closest valid key: a misspelt key would be ignored, and its reward load another file or fail on a
    missing one."""
    entries = list_entries() if specs is None else [get_entry(name) for spec in specs for name, _ in parse_spec(spec)]
    valid = sorted({file.key for entry in entries for file in entry.files})
    for key in paths:
        if key in valid:
            continue
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if specs is None:
            raise RewardError(f"no reward reads a file under the key {key!r}{hint}; "
                              "`texforce rewards list` shows each reward's keys")
        named = " or ".join(repr(spec) for spec in specs)
        its, it_reads = ("its", "it reads") if len(specs) == 1 else ("their", "they read")
        raise RewardError(f"no reward of {named} reads a file under the key {key!r}{hint}; "
                          + (f"{its} keys are {', '.join(valid)}" if valid else f"{it_reads} no files: drop the key"))


def build_reward(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    paths: Mapping[str, str] | None = None,
) -> Reward:
    """Build a `Reward` from a single name or a composite spec `"name:w,name:w"`.

    paths: model files by key (see `texforce rewards list` or each entry's `files`);
        `TEXFORCE_<KEY>` environment variables are the fallback.
    Builders report a missing or unusable model file as FileNotFoundError / ValueError and a
    missing package as ImportError; those become a RewardFileError / RewardDependencyError
    naming the reward (user errors: one line on the command line).
    """
    parsed = parse_spec(spec)
    scorers = []
    for name, _ in parsed:
        try:
            scorers.append(get_entry(name).build(paths=paths, device=device, dtype=dtype))
        except RewardError as error:
            raise type(error)(f"reward {name!r}: {error}") from error
        except ImportError as error:
            raise RewardDependencyError(f"reward {name!r}: {error}") from error
        except (FileNotFoundError, ValueError) as error:
            raise RewardFileError(f"reward {name!r}: {error}") from error
    return Reward(scorers, [w for _, w in parsed])


def _register_builtins() -> None:
    for entry in (
        RewardEntry("color_alignment", color.build_color_alignment, True, (),
                    "closeness of the pixels to the prompt's colour word (0 when it names none); the demo reward"),
        RewardEntry("brightness", color.build_brightness, True, (), "mean luma in [0,1]"),
        *(RewardEntry(name, objects.object_reward_builder(name), True, (), text)
          for name, text in objects.object_reward_names().items()),
        RewardEntry("jpeg_compressibility", jpeg.build_jpeg_compressibility, False, (),
                    "minus the JPEG size in kB at quality 95 (DDPO)"),
        RewardEntry("jpeg_incompressibility", jpeg.build_jpeg_incompressibility, False, (),
                    "the JPEG size in kB at quality 95 (DDPO)"),
        RewardEntry("imagereward", imagereward.build_imagereward, True, imagereward.FILES,
                    "ImageReward-v1.0 (BLIP ViT-L + BERT + MLP), normalised score"),
        RewardEntry("hpsv2", hps.build_hpsv2, True, hps.HPSV2_FILES,
                    "HPSv2.0: cosine of OpenCLIP ViT-H-14 image and text features"),
        RewardEntry("hpsv2_1", hps.build_hpsv2_1, True, hps.HPSV21_FILES,
                    "HPSv2.1: cosine of OpenCLIP ViT-H-14 image and text features"),
        RewardEntry("pickscore", clip_models.build_pickscore, True, clip_models.PICKSCORE_FILES,
                    "PickScore: logit_scale * cosine of CLIP-H image and text embeddings"),
        RewardEntry("clip_score", clip_models.build_clip_score, True, clip_models.CLIP_SCORE_FILES,
                    "100 * cosine of CLIP image and text embeddings"),
        RewardEntry("aesthetic", aesthetic.build_aesthetic, True, aesthetic.FILES,
                    "LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings"),
        RewardEntry("face_quality", detection.build_face_quality, False, detection.FILES,
                    "highest mediapipe face-detection confidence (needs mediapipe==0.10.21, numpy<2)"),
        RewardEntry("hand_detection", detection.build_hand_detection, False, detection.FILES,
                    "highest mediapipe palm-detection confidence, TexForce's hand reward (needs mediapipe==0.10.21, "
                    "numpy<2)"),
    ):
        register(entry)


_register_builtins()
