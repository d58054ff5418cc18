"""The toy world's words, train / held-out split and scene generator."""
from __future__ import annotations

import math

import pytest
import torch

from rewards.color import COLORS as RGB
from rl.prompts import BUILTIN
from toyworld.captions import (
    COLORS,
    SHAPES,
    all_combinations,
    caption,
    held_out_combinations,
    parse_caption,
    prompts_for,
    train_combinations,
)
from toyworld.scenes import COVERAGE, render_shapes, shape_moments, synthetic_scenes


def _scenes(seed: int, n: int = 64, size: int = 64, combinations=None):
    generator = torch.Generator().manual_seed(seed)
    return synthetic_scenes(n, size=size, generator=generator, combinations=combinations, return_masks=True)


# --- captions and the split ---------------------------------------------------------------------


def test_caption_grammar_round_trips_and_matches_the_builtin_colour_prompts():
    assert caption("magenta", "car") == "a magenta car"
    assert all(parse_caption(caption(c, s)) == (c, s) for c, s in all_combinations())
    assert parse_caption("A Red ball on the grass") == ("red", "ball")
    assert parse_caption("a reddish balloon") == (None, None)
    assert parse_caption("a photo of a dog") == (None, None)
    assert set(prompts_for(all_combinations())) == set(BUILTIN["colors"])


def test_split_is_fixed_disjoint_and_covers_every_word_in_training():
    train, held_out = train_combinations(), held_out_combinations()
    assert len(train) == 60 and len(held_out) == 20
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(all_combinations())
    assert train == train_combinations() and held_out == held_out_combinations()  # a rule, not a draw
    for color in COLORS:
        assert sum(c == color for c, _ in train) == 6 and sum(c == color for c, _ in held_out) == 2
    for shape in SHAPES:
        assert sum(s == shape for _, s in train) in (7, 8)
    assert ("magenta", "flower") in held_out and ("magenta", "car") in train


def test_prompt_files_of_the_split_are_the_split():
    """configs/ holds the split as prompt files (rl/ reads files and does not import the toy world)."""
    from pathlib import Path

    from rl.config import PromptConfig
    from rl.prompts import load_prompts

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_prompts(PromptConfig(file=str(configs / "prompts_toy_train.txt"))) == prompts_for(train_combinations())
    assert load_prompts(PromptConfig(file=str(configs / "prompts_toy_held_out.txt"))) == prompts_for(held_out_combinations())


# --- scenes -------------------------------------------------------------------------------------


def test_scenes_are_deterministic_from_the_generator():
    images, captions, masks = _scenes(0)
    again, captions_again, masks_again = _scenes(0)
    other, _, _ = _scenes(1)
    assert torch.equal(images, again) and captions == captions_again and torch.equal(masks, masks_again)
    assert not torch.equal(images, other)
    assert images.shape == (64, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1


def test_captions_cover_the_prompts_and_combinations_restrict_them():
    _, captions, _ = _scenes(0, n=256, size=16)
    assert set(captions) <= set(BUILTIN["colors"])
    assert len(set(captions)) > 40  # draws cover most of the 80 prompts
    _, captions, _ = _scenes(0, n=512, size=16, combinations=train_combinations())
    assert set(captions) == set(prompts_for(train_combinations()))  # all 60, none held out
    with pytest.raises(ValueError, match="combinations must be"):
        _scenes(0, n=4, size=16, combinations=[("teal", "ball")])


def test_object_pixels_have_the_caption_colour_and_the_intended_coverage():
    images, captions, masks = _scenes(2)
    coverage = masks.float().mean((1, 2))
    assert COVERAGE[0] - 0.05 < coverage.min() and coverage.max() < COVERAGE[1] + 0.05
    for image, text, mask in zip(images, captions, masks):
        rgb = torch.tensor(RGB[parse_caption(text)[0]])
        inside = image[:, mask].T  # [pixels, 3]
        outside = image[:, ~mask].T
        assert (inside - rgb).abs().max() < 1e-6
        # the background is muted: channels in [0.18, 0.82], spread <= 0.24 (the reader's rule)
        assert outside.min() >= 0.18 - 1e-6 and outside.max() <= 0.82 + 1e-6
        assert (outside.amax(1) - outside.amin(1)).max() <= 0.24 + 1e-6


def test_shape_moments_and_rendering_agree():
    area, centroid = shape_moments()
    ball = SHAPES.index("ball")
    assert area[ball] == pytest.approx(math.pi, rel=2e-3) and centroid[ball].abs().max() < 1e-3
    # a shape drawn at scale s covers s^2 * area of the image, whichever shape
    index = torch.arange(len(SHAPES))
    masks = render_shapes(index, torch.full((8,), 0.5), torch.full((8,), 0.5), torch.full((8,), 0.2), 256)
    assert masks.float().mean((1, 2)) == pytest.approx((0.04 * area).tolist(), rel=0.02)


def test_shapes_on_a_non_square_canvas_are_the_square_canvas_cut_to_size():
    """Coordinates are fractions of the longer side: a shape keeps its proportions where H != W (the reader's
    templates on a non-square sample), and a square canvas is drawn as before."""
    index = torch.arange(len(SHAPES))
    cx, cy, s = torch.linspace(0.3, 0.7, 8), torch.linspace(0.6, 0.2, 8), torch.full((8,), 0.15)
    square = render_shapes(index, cx, cy, s, 64)
    assert torch.equal(render_shapes(index, cx, cy, s, 48, 64), square[:, :48])
    assert torch.equal(render_shapes(index, cx, cy, s, 64, 40), square[:, :, :40])
    assert torch.equal(render_shapes(index, cx, cy, s, 64, 64), square)


def _background_steps(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute change `[n]` of the background between horizontal and between vertical neighbours
    (pairs of background pixels only)."""
    background = ~masks
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().sum(1) * (background[..., :, 1:] & background[..., :, :-1])
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().sum(1) * (background[..., 1:, :] & background[..., :-1, :])
    return dx.flatten(1).mean(1), dy.flatten(1).mean(1)


def test_backgrounds_are_flat_or_a_gradient_in_any_direction():
    """About half the backgrounds are one flat colour, the others a blend of two colours along a random direction:
    some run mostly left to right, some mostly top to bottom (not always along one diagonal)."""
    images, _, masks = _scenes(3, n=128)
    dx, dy = _background_steps(images, masks)
    flat = (dx < 1e-6) & (dy < 1e-6)
    assert 0.3 < flat.float().mean() < 0.7
    assert (dx[~flat] > 3 * dy[~flat]).any() and (dy[~flat] > 3 * dx[~flat]).any()


def test_a_shape_is_drawn_on_pixel_centres():
    """A pixel is inside when its centre ((i + 0.5) / side) is: a ball centred on an even canvas is symmetric,
    left to right and top to bottom (as the reader's centroids, also taken at pixel centres, assume)."""
    ball = SHAPES.index("ball")
    mask = render_shapes(torch.tensor([ball]), torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.3]), 16)[0]
    assert mask.any() and torch.equal(mask, mask.flip(0)) and torch.equal(mask, mask.flip(1))
