"""Synthetic scenes: one flat-coloured shape on a muted background, and its caption.

"a red ball" is a red disc covering `COVERAGE` of the image somewhere on a background that is
a flat colour or a two-colour gradient, each colour a grey in [0.3, 0.7] plus a tint of at most
0.12 per channel. The background is therefore never saturated (channel spread <= 0.24) and
never near black or white (channels in [0.18, 0.82]), while every object colour is at least
0.18 outside that box: the rule `toyworld.reader` segments the object by.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from rewards.color import COLORS as _RGB
from toyworld.captions import COLORS, SHAPES, all_combinations, caption

PALETTE = torch.tensor([_RGB[c] for c in COLORS])  # [len(COLORS), 3], the object colours
COVERAGE = (0.15, 0.45)  # fraction of the image the object covers, drawn uniformly
BACKGROUND_GREY = (0.3, 0.7)  # the grey level of each background colour, drawn uniformly
BACKGROUND_TINT = 0.12  # then each channel is shifted by up to +-this


# --- shapes -----------------------------------------------------------------------------------
# Each shape is a mask in coordinates normalised by the object's scale s: u = (x - cx) / s,
# v = (y - cy) / s, y pointing down; (cx, cy) is the shape's origin, not its centroid.


def _disc(u, v, cu, cv, r):
    return (u - cu) ** 2 + (v - cv) ** 2 < r**2


def _box(u, v, u0, u1, v0, v1):
    return (u > u0) & (u < u1) & (v > v0) & (v < v1)


def _ball(u, v):
    return _disc(u, v, 0, 0, 1)


def _car(u, v):
    body = _box(u, v, -1.2, 1.2, -0.1, 0.45)
    cabin = _box(u, v, -0.6, 0.6, -0.55, -0.1)
    return body | cabin | _disc(u, v, -0.65, 0.45, 0.28) | _disc(u, v, 0.65, 0.45, 0.28)


def _house(u, v):
    walls = _box(u, v, -0.8, 0.8, 0, 0.9)
    roof = (v > -0.85) & (v <= 0) & (u.abs() < 1.0 * (v + 0.85) / 0.85)
    return walls | roof


def _flower(u, v):
    r, theta = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
    petals = r < 0.55 + 0.45 * torch.cos(2.5 * theta).abs()
    return petals | _box(u, v, -0.07, 0.07, 0, 1.25)


def _apple(u, v):
    body = _disc(u, v, -0.3, 0.05, 0.75) | _disc(u, v, 0.3, 0.05, 0.75)
    return body | _box(u, v, -0.06, 0.06, -1.05, -0.5)


def _bird(u, v):
    body = (u / 1.0) ** 2 + (v / 0.55) ** 2 < 1
    tail = (u < -0.7) & (u > -1.4) & (v.abs() < (-0.7 - u) * 0.6)
    beak = (u > 1.15) & (u < 1.45) & ((v + 0.45).abs() < (1.45 - u) * 0.4)
    return body | tail | _disc(u, v, 0.85, -0.45, 0.35) | beak


def _cup(u, v):
    handle_r = torch.sqrt((u - 0.6) ** 2 + v**2)
    handle = (handle_r > 0.25) & (handle_r < 0.45) & (u > 0.6)
    return _box(u, v, -0.65, 0.65, -0.8, 0.8) | handle


def _hat(u, v):
    return _box(u, v, -1.3, 1.3, 0.3, 0.55) | _box(u, v, -0.7, 0.7, -0.6, 0.35)


SHAPE_MASKS = {"ball": _ball, "car": _car, "house": _house, "flower": _flower, "apple": _apple,
               "bird": _bird, "cup": _cup, "hat": _hat}  # fmt: skip
assert list(SHAPE_MASKS) == SHAPES, "one mask per shape word, in the caption order"


@lru_cache(maxsize=1)
def shape_moments() -> tuple[torch.Tensor, torch.Tensor]:
    """Area `[S]` and centroid `[S, 2]` (u, v) of each shape in unit coordinates.

    Measured on a 1024 x 1024 grid over [-2, 2]^2 (every shape fits inside), accurate to ~1e-3.
    """
    n = 1024
    coords = -2 + 4 * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    areas, centroids = [], []
    for mask_fn in SHAPE_MASKS.values():
        m = mask_fn(u, v).double()
        areas.append(m.sum() * (4 / n) ** 2)
        centroids.append(torch.stack([(m * u).sum(), (m * v).sum()]) / m.sum())
    return torch.stack(areas).float(), torch.stack(centroids).float()


def render_shapes(
    shape_idx: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, s: torch.Tensor, size: int, width: int | None = None
) -> torch.Tensor:
    """Masks `[n, size, width]` (bool; width defaults to size) of shapes `shape_idx [n]` with origin (cx, cy) `[n]`
    and scale s `[n]`.

    Coordinates are fractions of the image's longer side (so a shape keeps its proportions on a non-square image
    the reader reads); a pixel is inside when its centre is.
    """
    n, height = len(shape_idx), size
    width = size if width is None else width
    side = max(height, width)
    y = ((torch.arange(height, dtype=torch.float32) + 0.5) / side).view(1, height, 1)
    x = ((torch.arange(width, dtype=torch.float32) + 0.5) / side).view(1, 1, width)
    u = (x - cx.view(n, 1, 1)) / s.view(n, 1, 1)
    v = (y - cy.view(n, 1, 1)) / s.view(n, 1, 1)
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for k, mask_fn in enumerate(SHAPE_MASKS.values()):
        chosen = shape_idx == k
        if chosen.any():
            masks[chosen] = mask_fn(u[chosen], v[chosen])
    return masks


# --- scenes -----------------------------------------------------------------------------------


def _uniform(n: int, low: float, high: float, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


def synthetic_scenes(
    n: int,
    *,
    size: int,
    generator: torch.Generator,
    combinations: list[tuple[str, str]] | None = None,
    return_masks: bool = False,
) -> tuple[torch.Tensor, list[str]] | tuple[torch.Tensor, list[str], torch.Tensor]:
    """n scenes `[n, 3, size, size]` in [0, 1] and their captions "a {color} {shape}".

    combinations: the (colour, shape) pairs to draw from, uniformly (default: all 80; pass
        `toyworld.captions.train_combinations()` to keep the held-out pairs unseen).
    A muted background (module docstring) and one flat-coloured shape covering `COVERAGE` of
    the image at a random place. Deterministic from `generator`.
    With `return_masks`, also the object masks `[n, size, size]` (bool).
    """
    g = generator
    pairs = all_combinations() if combinations is None else list(combinations)
    unknown = [p for p in pairs if p[0] not in COLORS or p[1] not in SHAPES]
    if not pairs or unknown:
        raise ValueError(f"combinations must be (colour, shape) pairs of {COLORS} x {SHAPES}; got {unknown or pairs}")
    drawn = torch.randint(len(pairs), (n,), generator=g).tolist()
    color_idx = torch.tensor([COLORS.index(pairs[k][0]) for k in drawn], dtype=torch.long)
    shape_idx = torch.tensor([SHAPES.index(pairs[k][1]) for k in drawn], dtype=torch.long)
    coverage = _uniform(n, *COVERAGE, g)
    # background: two muted colours (a grey plus a small tint), blended along a direction
    ends = _uniform(n, *BACKGROUND_GREY, g, 2, 1) + _uniform(n, -BACKGROUND_TINT, BACKGROUND_TINT, g, 2, 3)
    flat = torch.rand(n, generator=g) < 0.5
    ends[flat, 1] = ends[flat, 0]
    angle = _uniform(n, 0, 2 * math.pi, g)
    # object placement: scale s from the coverage, origin kept so most of the shape is inside
    s = torch.sqrt(coverage / shape_moments()[0][shape_idx])
    margin = (0.9 * s).clamp(max=0.45)
    cx, cy = (margin[:, None] + (1 - 2 * margin[:, None]) * torch.rand(n, 2, generator=g)).unbind(1)

    coords = (torch.arange(size) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    ramp = ((x - 0.5) * angle.cos().view(n, 1, 1) + (y - 0.5) * angle.sin().view(n, 1, 1)) * math.sqrt(2) + 0.5
    ramp = ramp.clamp(0, 1).unsqueeze(1)  # [n, 1, size, size]
    background = ends[:, 0, :, None, None] * (1 - ramp) + ends[:, 1, :, None, None] * ramp
    masks = render_shapes(shape_idx, cx, cy, s, size)
    color = PALETTE[color_idx].view(n, 3, 1, 1)
    images = torch.where(masks.unsqueeze(1), color, background).clamp(0, 1)
    captions = [caption(COLORS[c], SHAPES[o]) for c, o in zip(color_idx.tolist(), shape_idx.tolist())]
    if return_masks:
        return images, captions, masks
    return images, captions
