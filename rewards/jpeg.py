"""JPEG compressibility / incompressibility (DDPO, Black et al. 2023).

The file size in kB of each image encoded by PIL at quality 95; compressibility is its
negative. Not differentiable (the encoder is not), so the scores carry no gradient.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

QUALITY = 95


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """`[B,3,H,W]` in [0,1] -> `[B,H,W,3]` uint8, rounded as an image writer would."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    """`[B,3,H,W]` in [0,1] -> `[B]` JPEG size in kB (1 kB = 1000 bytes) at quality 95."""
    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=QUALITY)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSize:
    """`sign * jpeg_size_kb(images)`: sign -1 rewards compressible images, +1 incompressible ones."""

    differentiable = False

    def __init__(self, *, name: str, sign: float):
        self.name = name
        self.sign = sign

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images)


def build_jpeg_compressibility(*, paths=None, device=None, dtype=None) -> JpegSize:
    return JpegSize(name="jpeg_compressibility", sign=-1.0)


def build_jpeg_incompressibility(*, paths=None, device=None, dtype=None) -> JpegSize:
    return JpegSize(name="jpeg_incompressibility", sign=1.0)
