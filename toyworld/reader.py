"""Read a scene's object back from its pixels: which colour, which shape.

1. Segment. The toy world's backgrounds are muted (`toyworld.scenes`): every background
   pixel has channels in [0.18, 0.82] and a channel spread (max - min) of at most 0.24, and
   every object colour lies at least 0.18 outside that box (white and black by their
   brightness, the others by their saturation). A pixel's *objectness* is how far it lies
   outside the box,

       d(p) = max(spread(p) - 0.24, 0.18 - min_c p_c, max_c p_c - 0.82),

   <= 0 on any background and >= 0.18 on any object colour. A pixel is object when
   `d > 0.09` *and* it is more than 0.15 (RGB distance) away from the image's own background
   colour, the per-channel median of a ring of pixels 3/64 to 6/64 of the (shorter) side in
   from the edge. On the world's scenes the second test never changes the mask (every object colour
   is >= 0.21 from every muted colour, and objects cover < 1/3 of the ring); it keeps a
   generated image's background out of the object when the model paints it outside the muted
   box (near white, lavender, olive), which the tiny model often does. The outermost 2/64 of
   the (shorter) side is not read at all: the tiny VAE paints a frame there.
   Fewer than `MIN_AREA` of the pixels in the mask: no object was drawn.
2. Colour: the palette colour nearest (RGB distance) to the per-channel median of the
   object's pixels, so edge pixels blended with the background do not shift it.
3. Shape: each shape's template is placed where the object is (its centroid matched to the
   object's centroid, its scale chosen so its area equals the object's area; shapes are never
   rotated) and scored by intersection over union with the object mask; the best IoU names
   the shape. Positions are fractions of the image's longer side, so on a non-square image
   (H != W) the templates keep their proportions; on a square one this is the plain side.

`read_objects` is exact (and not differentiable). `soft_read` is the same reading with soft
steps, differentiable in the pixels, for gradient learners: a sigmoid of the objectness for
the mask, the mask-weighted mean colour for the colour, a soft IoU for the shape, and a
softmax over the palette / the shapes for probabilities. Every image is read on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from toyworld.captions import COLORS, SHAPES
from toyworld.scenes import BACKGROUND_GREY, BACKGROUND_TINT, PALETTE, render_shapes, shape_moments

BACKGROUND_LOW = BACKGROUND_GREY[0] - BACKGROUND_TINT  # 0.18: no background channel is darker
BACKGROUND_HIGH = BACKGROUND_GREY[1] + BACKGROUND_TINT  # 0.82: nor brighter
BACKGROUND_SPREAD = 2 * BACKGROUND_TINT  # 0.24: nor more saturated
OBJECT_THRESHOLD = 0.09  # objectness above this is object: half the smallest object margin (0.18)
BACKGROUND_DISTANCE = 0.15  # and farther than this from the image's background colour (the ring's median)
FRAME = 2 / 64  # the outermost band, as a fraction of the side, is not read
RING = (3 / 64, 6 / 64)  # the band the background colour is taken from
MIN_AREA = 0.02  # an object mask smaller than this fraction of the image counts as no object
SOFT_EDGE = 0.02  # soft mask: sigmoid((d - threshold) / SOFT_EDGE)
SOFT_COLOR_TEMPERATURE = 0.02  # colour probabilities: softmax(-squared RGB distance / this)
SOFT_SHAPE_TEMPERATURE = 0.05  # shape probabilities: softmax(IoU / this)


def objectness(images: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` in [0, 1] -> `[B, H, W]`: how far each pixel lies outside the background box."""
    high, low = images.amax(1), images.amin(1)
    return torch.stack([high - low - BACKGROUND_SPREAD, BACKGROUND_LOW - low, high - BACKGROUND_HIGH]).amax(0)


def _edge_distance(size: int, device: torch.device) -> torch.Tensor:
    """`[size]`: each pixel's distance (in pixels) to the nearer end of its row or column."""
    index = torch.arange(size, device=device)
    return torch.minimum(index, size - 1 - index)


def _bands(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, ring) `[height, width]` bool: the pixels that are read, and those the background colour comes from.

    The bands are as deep as their fraction of the shorter side, on all four edges.
    """
    depth = torch.minimum(_edge_distance(height, device)[:, None], _edge_distance(width, device)[None, :])
    frame, ring_start, ring_end = (max(1, round(f * min(height, width))) for f in (FRAME, *RING))
    return depth >= frame, (depth >= ring_start) & (depth < max(ring_end, ring_start + 1))


def background_distance(images: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` -> `[B, H, W]`: RGB distance of each pixel to the image's background colour
    (per-channel median of the ring, treated as a constant: no gradient flows through it)."""
    _, ring = _bands(*images.shape[-2:], images.device)
    background = images.detach()[:, :, ring].median(dim=2).values  # [B, 3]
    return (images - background[:, :, None, None]).pow(2).sum(1).add(1e-12).sqrt()


@dataclass
class Reading:
    """What `read_objects` found in B images.

    color, shape: `[B]` long, indices into `toyworld.captions.COLORS` / `SHAPES`, -1 where no object.
    area: `[B]` fraction of the image the object covers. shape_iou: `[B, len(SHAPES)]` each
    template's IoU with the object mask (0 where no object).
    """

    color: torch.Tensor
    shape: torch.Tensor
    area: torch.Tensor
    shape_iou: torch.Tensor

    def names(self) -> list[tuple[str | None, str | None]]:
        """(colour, shape) words per image, None where no object."""
        return [
            (COLORS[c] if c >= 0 else None, SHAPES[s] if s >= 0 else None)
            for c, s in zip(self.color.tolist(), self.shape.tolist())
        ]


def _moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Area fraction `[B]` of masks `[B, H, W]` (float) and centroid x, y `[B]` (fractions of the longer side)."""
    height, width = mask.shape[-2:]
    side = max(height, width)
    x = (torch.arange(width, dtype=mask.dtype, device=mask.device) + 0.5) / side
    y = (torch.arange(height, dtype=mask.dtype, device=mask.device) + 0.5) / side
    mass = mask.sum((1, 2)).clamp_min(1e-6)
    cx = (mask.sum(1) * x).sum(1) / mass
    cy = (mask.sum(2) * y).sum(1) / mass
    return mask.mean((1, 2)), cx, cy


def _templates(area: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Every shape placed on every object: `[B, S, height, width]` bool.

    Placement: scale s with s^2 * unit_area = area (as a fraction of the longer side squared; the image's
    area fraction on a square image), origin = centroid - s * unit_centroid.
    """
    unit_area, unit_centroid = shape_moments()
    batch, num_shapes = len(area), len(SHAPES)
    side_area = height * width / max(height, width) ** 2  # 1.0 on a square image
    s = torch.sqrt(area.cpu().float()[:, None] * side_area / unit_area[None, :])  # [B, S]
    ox = cx.cpu().float()[:, None] - s * unit_centroid[None, :, 0]
    oy = cy.cpu().float()[:, None] - s * unit_centroid[None, :, 1]
    shape_idx = torch.arange(num_shapes).expand(batch, num_shapes)
    masks = render_shapes(shape_idx.flatten(), ox.flatten(), oy.flatten(), s.flatten().clamp_min(1e-4), height, width)
    return masks.view(batch, num_shapes, height, width)


def _iou(mask: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Soft IoU of masks `[B, H, W]` in [0, 1] (0 on the frame) with templates `[B, S, H, W]` -> `[B, S]`,
    counted on the pixels that are read."""
    inside, _ = _bands(*mask.shape[-2:], mask.device)
    t = (templates & inside).to(mask.dtype)
    m = mask[:, None]
    intersection = (m * t).sum((-1, -2))
    union = (m + t - m * t).sum((-1, -2))
    return intersection / union.clamp_min(1e-6)


@torch.no_grad()
def read_objects(images: torch.Tensor) -> Reading:
    """Exact reading of `[B, 3, H, W]` images in [0, 1] (any H, W): colour and shape indices (module docstring)."""
    x = images.detach().float().cpu()
    inside, _ = _bands(*x.shape[-2:], x.device)
    mask = (objectness(x) > OBJECT_THRESHOLD) & (background_distance(x) > BACKGROUND_DISTANCE) & inside  # [B, H, W]
    area, cx, cy = _moments(mask.float())
    found = area >= MIN_AREA
    color = torch.full((len(x),), -1, dtype=torch.long)
    for i in torch.nonzero(found).flatten().tolist():
        median = x[i][:, mask[i]].median(dim=1).values  # [3]
        color[i] = (PALETTE - median).norm(dim=1).argmin()
    shape_iou = _iou(mask.float(), _templates(area, cx, cy, *x.shape[-2:]))  # [B, S]
    shape_iou = torch.where(found[:, None], shape_iou, torch.zeros_like(shape_iou))
    shape = torch.where(found, shape_iou.argmax(1), torch.full_like(color, -1))
    return Reading(color=color, shape=shape, area=area, shape_iou=shape_iou)


def soft_read(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable reading of `[B, 3, H, W]` in [0, 1]: colour `[B, len(COLORS)]` and shape
    `[B, len(SHAPES)]` probabilities; gradients reach the pixels through both.
    """
    x = images.float()
    inside, _ = _bands(*x.shape[-2:], x.device)
    weight = (
        torch.sigmoid((objectness(x) - OBJECT_THRESHOLD) / SOFT_EDGE)
        * torch.sigmoid((background_distance(x) - BACKGROUND_DISTANCE) / SOFT_EDGE)
        * inside
    )  # [B, H, W]
    mean_color = (x * weight[:, None]).sum((2, 3)) / weight.sum((1, 2)).clamp_min(1e-6)[:, None]  # [B, 3]
    distance2 = (mean_color[:, None, :] - PALETTE.to(x.device)[None]).pow(2).sum(-1)  # [B, C]
    color_probs = torch.softmax(-distance2 / SOFT_COLOR_TEMPERATURE, dim=1)
    with torch.no_grad():  # placement from the soft mask's moments; the IoU carries the gradient
        area, cx, cy = _moments(weight.detach())
        templates = _templates(area, cx, cy, *x.shape[-2:]).to(x.device)
    shape_iou = _iou(weight, templates)  # [B, S]
    shape_probs = torch.softmax(shape_iou / SOFT_SHAPE_TEMPERATURE, dim=1)
    return color_probs, shape_probs
