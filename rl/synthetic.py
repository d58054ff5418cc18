"""Synthetic scenes and a short offline pretraining that makes the tiny pipeline follow colour words.

The random tiny pipeline (`rl.tiny`) ignores its prompt, and its random VAE cannot even paint
a globally coloured image, so no fine-tuning of the text encoder can raise `color_alignment`.
`pretrain_tiny` fixes that in a few CPU minutes, the way Stable Diffusion itself was made:

1. train the VAE as an autoencoder on synthetic scenes ("a red ball": one flat-coloured shape
   on a muted background) and set `vae.config.scaling_factor` so scaled latents have unit std;
2. train the U-Net and the text encoder together with the DDPM epsilon-prediction loss on
   those latents, dropping ~10% of captions to "" so classifier-free guidance works.

The object covers 15-45% of a scene, so a model that reproduces the scenes scores about
0.6-0.7 on `color_alignment`: clearly above the random model, yet with headroom for RL
(a bigger or purer object scores more).
"""
from __future__ import annotations

import math

import torch

from rewards.color import COLORS as _RGB
from rl.prompts import BUILTIN, COLORS

PALETTE = torch.tensor([_RGB[c] for c in COLORS])  # [len(COLORS), 3], the colours of rl.prompts
COVERAGE = (0.15, 0.45)  # fraction of the image the object covers, drawn uniformly


# --- scenes -----------------------------------------------------------------------------------
# Each shape is a mask in coordinates normalised by the object's scale s: u = (x - cx) / s,
# v = (y - cy) / s, y pointing down. `_UNIT_AREA` is each mask's area in those units
# (measured numerically), so s = sqrt(coverage / unit_area) gives the drawn coverage.


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


SHAPES = {"ball": _ball, "car": _car, "house": _house, "flower": _flower, "apple": _apple,
          "bird": _bird, "cup": _cup, "hat": _hat}  # fmt: skip
OBJECTS = list(SHAPES)
_UNIT_AREA = {"ball": 3.13, "car": 2.09, "house": 2.28, "flower": 2.3, "apple": 2.68,
              "bird": 2.28, "cup": 2.26, "hat": 1.89}  # fmt: skip
assert {f"a {c} {o}" for c in COLORS for o in OBJECTS} == set(BUILTIN["colors"]), "scenes cover the colour prompts"


def _uniform(n: int, low: float, high: float, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


def synthetic_scenes(
    n: int, *, size: int, generator: torch.Generator, return_masks: bool = False
) -> tuple[torch.Tensor, list[str]] | tuple[torch.Tensor, list[str], torch.Tensor]:
    """n scenes `[n, 3, size, size]` in [0, 1] and their captions "a {color} {object}".

    A muted background (a flat colour or a two-colour gradient) and one flat-coloured shape
    covering `COVERAGE` of the image at a random place. Deterministic from `generator`.
    With `return_masks`, also the object masks `[n, size, size]` (bool).
    """
    g = generator
    color_idx = torch.randint(len(COLORS), (n,), generator=g)
    object_idx = torch.randint(len(OBJECTS), (n,), generator=g)
    coverage = _uniform(n, *COVERAGE, g)
    # background: two muted colours (grey in [0.3, 0.7] plus a small tint), blended along a direction
    ends = _uniform(n, 0.3, 0.7, g, 2, 1) + _uniform(n, -0.12, 0.12, g, 2, 3)  # [n, 2, 3]
    flat = torch.rand(n, generator=g) < 0.5
    ends[flat, 1] = ends[flat, 0]
    angle = _uniform(n, 0, 2 * math.pi, g)
    # object placement: scale s from the coverage, centre kept so most of the shape is inside
    unit_area = torch.tensor([_UNIT_AREA[o] for o in OBJECTS])[object_idx]
    s = torch.sqrt(coverage / unit_area)
    margin = (0.9 * s).clamp(max=0.45)
    cx, cy = (margin[:, None] + (1 - 2 * margin[:, None]) * torch.rand(n, 2, generator=g)).unbind(1)

    coords = (torch.arange(size) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    ramp = ((x - 0.5) * angle.cos().view(n, 1, 1) + (y - 0.5) * angle.sin().view(n, 1, 1)) * math.sqrt(2) + 0.5
    ramp = ramp.clamp(0, 1).unsqueeze(1)  # [n, 1, size, size]
    background = ends[:, 0, :, None, None] * (1 - ramp) + ends[:, 1, :, None, None] * ramp
    u = (x - cx.view(n, 1, 1)) / s.view(n, 1, 1)
    v = (y - cy.view(n, 1, 1)) / s.view(n, 1, 1)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for k, shape in enumerate(SHAPES.values()):
        chosen = object_idx == k
        if chosen.any():
            masks[chosen] = shape(u[chosen], v[chosen])
    color = PALETTE[color_idx].view(n, 3, 1, 1)
    images = torch.where(masks.unsqueeze(1), color, background).clamp(0, 1)
    captions = [f"a {COLORS[c]} {OBJECTS[o]}" for c, o in zip(color_idx.tolist(), object_idx.tolist())]
    if return_masks:
        return images, captions, masks
    return images, captions
