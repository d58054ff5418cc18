"""The reward contract: images `[B,3,H,W]` in [0,1] plus prompts in, scores `[B]` out.

A *scorer* computes one named score. A `Reward` holds one or more scorers with weights and
returns a `RewardOutput` with the weighted sum and every part, so the trainer can log each
part and see which one went non-finite (nothing is averaged away here).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


class RewardError(ValueError):
    """A user error about rewards: a bad spec, a model file key no reward reads, a missing or unusable
    model file, unreadable input. Command lines print it as one line and exit with code 2."""


class RewardSpecError(RewardError):
    """A reward spec that does not parse: an unknown name, a bad or non-finite weight, a duplicate."""


class RewardFileError(RewardError, FileNotFoundError):
    """A model file a reward needs is not given, not found, or cannot be used."""


class RewardDependencyError(RewardError, ImportError):
    """A package a reward needs is not importable (e.g. mediapipe for face_quality)."""


class Scorer(Protocol):
    """One score. `__call__(images [B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]`."""

    name: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


@dataclass
class RewardOutput:
    """What a `Reward` returns.

    scores: `[B]` float32, the weighted sum of the parts; NaN/inf are kept, never hidden.
    parts: name -> `[B]` float32, each part unweighted; a scorer with `score_with_parts` (the
        toy world's object rewards) adds its details as `{name}_{detail}`, which the sum ignores.
    """

    scores: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FiniteReport:
    """Which samples and which parts went non-finite; see `check_finite`.

    mask: `[B]` bool, True where the summed score and every part are finite.
    bad: part name (or "scores" for the sum) -> indices of non-finite samples.
    """

    mask: torch.Tensor
    bad: dict[str, list[int]]

    @property
    def ok(self) -> bool:
        return not self.bad

    def __str__(self) -> str:
        if self.ok:
            return "all rewards finite"
        return "non-finite rewards: " + "; ".join(
            f"{name} at samples {idx}" for name, idx in self.bad.items()
        )


def check_finite(output: RewardOutput) -> FiniteReport:
    """Name the samples and parts whose scores are NaN or inf; the caller drops or stops."""
    mask = torch.isfinite(output.scores.detach())
    bad: dict[str, list[int]] = {}
    for name, part in output.parts.items():
        finite = torch.isfinite(part.detach())
        mask &= finite
        if not bool(finite.all()):
            bad[name] = torch.nonzero(~finite).flatten().tolist()
    sum_bad = torch.nonzero(~torch.isfinite(output.scores.detach())).flatten().tolist()
    if sum_bad:
        bad["scores"] = sum_bad
    return FiniteReport(mask=mask.cpu(), bad=bad)


def check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Fail early with a readable message instead of a shape error deep inside a model."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W] in [0,1]; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0,1]; got dtype {images.dtype}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, one per image, not a single string")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


class Reward:
    """A weighted sum of scorers. Call with images `[B,3,H,W]` in [0,1] and B prompts.

    name: the spec it was built from, e.g. "imagereward:1.0,aesthetic:0.5".
    differentiable: True when every part passes gradients to the images.
    weights: part name -> weight.
    """

    def __init__(self, scorers: Sequence[Scorer], weights: Sequence[float]):
        if not scorers:
            raise ValueError("a Reward needs at least one scorer")
        if len(scorers) != len(weights):
            raise ValueError(f"{len(scorers)} scorers but {len(weights)} weights")
        self.scorers = list(scorers)
        self.weights = {s.name: float(w) for s, w in zip(scorers, weights)}
        self.name = ",".join(f"{s.name}:{w:g}" for s, w in zip(scorers, weights))
        self.differentiable = all(s.differentiable for s in scorers)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        check_inputs(images, prompts)
        prompts = list(prompts)
        parts: dict[str, torch.Tensor] = {}
        total = None
        for scorer in self.scorers:
            if hasattr(scorer, "score_with_parts"):  # a scorer that also reports what its score averages
                part, details = scorer.score_with_parts(images, prompts)
                parts |= {f"{scorer.name}_{key}": value.float() for key, value in details.items()}
            else:
                part = scorer(images, prompts)
            part = part.float()
            if part.shape != (images.shape[0],):
                raise RuntimeError(
                    f"scorer {scorer.name!r} returned shape {tuple(part.shape)}, "
                    f"expected ({images.shape[0]},)"
                )
            parts[scorer.name] = part
            term = self.weights[scorer.name] * part.to(images.device)
            total = term if total is None else total + term
        broken = ~torch.isfinite(images.detach()).flatten(1).all(dim=1)
        if bool(broken.any()):  # a scorer may read a NaN image as a plain picture (JPEG size, colours): it has no score
            parts = {name: part.masked_fill(broken.to(part.device), float("nan")) for name, part in parts.items()}
            total = total.masked_fill(broken, float("nan"))
        return RewardOutput(scores=total, parts=parts)

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, differentiable={self.differentiable})"
