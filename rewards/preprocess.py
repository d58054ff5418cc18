"""Tensor preprocessing (resize, center crop or letterbox, normalise) that keeps gradients to the image.

The official pipelines use PIL + torchvision (`Resize(n, BICUBIC)`, `CenterCrop(n)`,
`Normalize`; HPSv2 instead fits the longer side and zero-pads); doing the same on tensors lets
a differentiable reward pass gradients back to the generated image and needs no torchvision.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# OpenAI CLIP statistics, used by CLIP, OpenCLIP (HPSv2), PickScore, LAION aesthetic and BLIP/ImageReward.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[B,C,H,W]` -> `[B,C,H',W']` with min(H',W') = size, bicubic with antialiasing.

    Matches torchvision `Resize(size)` rounding: the longer side is `int(size * long / short)`.
    """
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[B,C,H,W]` -> `[B,C,size,size]`, the offsets rounded as torchvision's `CenterCrop`."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {size}px from a {h}x{w} image; resize first")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return images[..., top:top + size, left:left + size]


def resize_longer_side_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[B,C,H,W]` -> `[B,C,size,size]`: the longer side resized to `size`, the rest padded with 0.

    HPSv2's eval transform (its open_clip fork's `ResizeMaxSize`, run after `ToTensor`, so the
    padding is black before normalisation): each side becomes `round(side * size / longer)`
    (Python's half-to-even round), the top/left get `pad // 2` of the padding and the
    bottom/right the rest. Resizing is bicubic with antialiasing, unclamped, as torchvision>=0.17
    resizes that float tensor. Unlike the official transform, an image whose longer side is
    already `size` is padded too, so the output is always square.
    """
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`(x - mean) / std` per channel, `[B,3,H,W]`."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype | None = None,
    letterbox: bool = False,
) -> torch.Tensor:
    """The CLIP-family eval transform on tensors: `[B,3,H,W]` in [0,1] -> `[B,3,size,size]` normalised.

    The shorter side is resized to `size` and the centre cropped, or with `letterbox` the longer
    side is resized and the rest zero-padded (HPSv2, `resize_longer_side_and_pad`); square images
    give the same pixels either way. Resizing runs in float32 (bicubic in half precision is
    poor), then casts to `dtype`.
    """
    x = images.float()
    x = resize_longer_side_and_pad(x, size) if letterbox else center_crop(resize_shorter_side(x, size), size)
    x = normalize(x, mean, std)
    return x.to(dtype or images.dtype)
