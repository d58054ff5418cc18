"""HPSv2's eval transform on tensors: resize the longer side, zero-pad the shorter one (letterbox).

The reference is built independently with PIL: bicubic on float channels (PIL's antialiased
bicubic, the kernel torch's `antialias=True` follows), pasted onto a black square at the offsets
open_clip's `ResizeMaxSize` uses, then normalised. The expected sizes and offsets are written
out by hand rather than computed with the code under test.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.preprocess import CLIP_MEAN, CLIP_STD, center_crop, clip_preprocess, resize_shorter_side

pytest_plugins = ("rewards_fixtures",)  # the session fixture tiny_reward_files (see test_rewards_models)
if TYPE_CHECKING:
    from rewards_fixtures import TinyRewardFiles

HPS = ["hpsv2", "hpsv2_1"]
PROMPTS = ["a red ball on the grass", "a photo of a blue car"]
# (input H, W), output size, (resized H, W), (top, left): the longer side becomes `size`, the shorter
# round(side * size / longer) with Python's half-to-even round; top/left get floor(pad / 2).
GEOMETRY = [
    ((48, 80), 32, (19, 32), (6, 0)),  # 19.2 -> 19, pad 13 = 6 + 7
    ((80, 48), 32, (32, 19), (0, 6)),
    ((45, 64), 32, (22, 32), (5, 0)),  # 22.5 -> 22 (half to even), pad 10 = 5 + 5
    ((512, 768), 224, (149, 224), (37, 0)),  # SD 2:3 at HPSv2's 224: 149.33 -> 149, pad 75 = 37 + 38
    ((59, 80), 32, (24, 32), (4, 0)),  # 23.6 -> 24 (rounded, not truncated), pad 8 = 4 + 4
    ((20, 32), 32, (20, 32), (6, 0)),  # longer side already 32: not resized, still padded to a square
]


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _pil_letterbox(images: torch.Tensor, size: int, resized: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
    """`[B,3,H,W]` in [0,1] -> `[B,3,size,size]` in [0,1], with PIL, channel by channel in float."""
    (h, w), (top, left) = resized, offset
    out = torch.empty(images.shape[0], 3, size, size)
    for b in range(images.shape[0]):
        for c in range(3):
            channel = Image.fromarray(images[b, c].numpy().astype(np.float32)).resize((w, h), Image.BICUBIC)
            canvas = Image.new("F", (size, size), 0.0)
            canvas.paste(channel, (left, top))
            out[b, c] = torch.from_numpy(np.array(canvas))
    return out


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def hps(tiny_reward_files: TinyRewardFiles) -> dict[str, rewards.Reward]:
    return {name: rewards.build_reward(name, paths=tiny_reward_files.paths) for name in HPS}


@pytest.mark.parametrize(("shape", "size", "resized", "offset"), GEOMETRY)
def test_letterbox_matches_pil_reference(shape, size, resized, offset):
    images = _images(2, *shape)
    ours = clip_preprocess(images, size, letterbox=True)
    assert ours.shape == (2, 3, size, size)
    ref = _normalise(_pil_letterbox(images, size, resized, offset))
    # float32 against PIL's double-precision kernel: <2e-5 after dividing by std (~5e-6 in pixels)
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=0)
    # exactly the padding is black: (0 - mean) / std there, image content everywhere else
    (h, w), (top, left) = resized, offset
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    black = _normalise(torch.zeros(1, 3, 1, 1)).expand_as(ours)
    assert torch.equal(ours[..., ~inside], black[..., ~inside])
    assert (ours[..., inside] != black[..., inside]).all()


@pytest.mark.parametrize("side", [32, 40, 64])
def test_letterbox_leaves_square_images_as_the_crop_did(side):
    images = _images(2, side, side)
    assert torch.equal(clip_preprocess(images, 32, letterbox=True), clip_preprocess(images, 32))


@pytest.mark.parametrize("name", HPS)
@pytest.mark.parametrize(("shape", "resized", "offset"), [((48, 80), (19, 32), (6, 0)), ((80, 48), (32, 19), (0, 6))])
def test_hps_scores_the_letterboxed_image(hps, name, shape, resized, offset):
    reward = hps[name]
    images = _images(2, *shape)
    letterboxed = _pil_letterbox(images, 32, resized, offset)  # square at the model's size: scored as is
    cropped = center_crop(resize_shorter_side(images, 32), 32)  # what the scorer did before
    with torch.no_grad():
        scores = reward(images, PROMPTS).scores
        want = reward(letterboxed, PROMPTS).scores
        crop_scores = reward(cropped, PROMPTS).scores
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
    assert (scores - crop_scores).abs().min() > 1e-2  # 0.05-0.2 with these tiny models


def test_letterbox_gradients_reach_every_pixel(hps):
    images = _images(1, 48, 80).requires_grad_()
    weights = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (clip_preprocess(images, 32, letterbox=True) * weights).sum().backward()
    assert (images.grad != 0).all()
    # through the scorer too, including the columns at the sides that a center crop drops
    images.grad = None
    hps["hpsv2"](images, PROMPTS[:1]).scores.sum().backward()
    assert (images.grad.abs().sum(dim=(0, 1, 2)) > 0).all()
