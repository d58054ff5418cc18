"""Weight-free rewards: colour-word alignment (the embedded demo's reward) and brightness.

`color_alignment` reads the first colour word of the prompt ("a red ball on the grass" ->
red) and scores how close the image's pixels are to that colour:

    score = 1 - mean_pixels ||p - c|| / d_max(c)

with `c` the colour's RGB in [0,1] and `d_max(c)` the distance from `c` to the farthest corner
of the RGB cube, so a solid image of the colour scores 1 and the farthest colour 0. For the
eight cube corners (red, green, blue, yellow, cyan, magenta, white, black) a mid-grey image
scores exactly 0.5 and uniform noise about 0.45, so a random model's images sit mid-range,
where the signal is smooth and unsaturated. The distance's gradient has unit norm per pixel,
so it never vanishes. A prompt without a colour word scores 0 (a constant, so it gives no
advantage signal and no gradient). Works at any resolution.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "brown": (0.6, 0.3, 0.1),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}
NO_COLOR_SCORE = 0.0
_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_EPS = 1e-6  # keeps the distance differentiable at exactly the target colour


def find_color(prompt: str) -> str | None:
    """The first colour word in the prompt (case-insensitive), or None."""
    match = _WORD.search(prompt.lower())
    return match.group(1) if match else None


def color_distance_score(images: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """`[B,3,H,W]` and target colours `[B,3]` in [0,1] -> `[B]` in [0,1], 1 = every pixel is the colour."""
    c = rgb.view(-1, 3, 1, 1)
    dist = ((images - c) ** 2).sum(1).add(_EPS).sqrt()  # [B,H,W]
    d_max = torch.maximum(rgb, 1 - rgb).pow(2).sum(-1).sqrt()  # [B]
    return 1 - dist.flatten(1).mean(1) / d_max


class ColorAlignment:
    """Prompt-aware, differentiable: more of the prompt's colour -> higher score (module docstring)."""

    name = "color_alignment"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = images.float()
        colors = [find_color(p) for p in prompts]
        has = torch.tensor([c is not None for c in colors], device=x.device)
        rgb = torch.tensor([COLORS[c] if c else COLORS["gray"] for c in colors], device=x.device)
        score = color_distance_score(x, rgb)
        return torch.where(has, score, torch.full_like(score, NO_COLOR_SCORE))


class Brightness:
    """Mean luma (Rec. 601) in [0,1], `[B,3,H,W]` -> `[B]`; prompt-independent, differentiable."""

    name = "brightness"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1).flatten(1).mean(1)


def build_color_alignment(*, paths=None, device=None, dtype=None) -> ColorAlignment:
    return ColorAlignment()


def build_brightness(*, paths=None, device=None, dtype=None) -> Brightness:
    return Brightness()
