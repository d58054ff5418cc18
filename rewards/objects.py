"""`object_alignment`: does the image show the object the prompt names? (the toy world's reward)

The prompt names a colour and a shape ("a magenta car", `toyworld.captions`); the image is
read back by `toyworld.reader` (the object segmented from the muted background, its colour
from its own pixels, its shape by template IoU). Per attribute, 1 if the image shows the
named one and 0 if not (also when no object is found, or the prompt names no such word);
the score is the mean over the two attributes, so 0, 0.5 or 1 per image:

    object_alignment = (1[colour read == colour named] + 1[shape read == shape named]) / 2

`object_color` and `object_shape` score one attribute each (two LoRAs, one per attribute,
are what LoRA fusion combines); all three log both attributes as parts.

The values are exact; gradients (when the images require them) are those of the soft
reading, the mean of the named colour's and shape's probabilities (`toyworld.reader.soft_read`),
passed straight through: score = exact + soft - soft.detach(). `parts` gives the exact
per-attribute scores, `soft_parts` the soft ones.

`object_alignment_soft` (and `object_color_soft`, `object_shape_soft`) score the soft reading
itself: the named colour's and shape's probabilities, in [0, 1], with partial credit for a
nearly right colour or silhouette. A policy-gradient learner sees less quantisation noise in it
than in the 0 / 0.5 / 1 of the exact score (docs/demo.md, "What the demo's gain depends on"); the
parts they log stay the exact per-attribute scores, so accuracy reads the same.

Images are read one by one, so a score does not depend on its batch-mates. `toyworld` is
imported when the reward is first called.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _named(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and shape indices `[B]` named by each prompt, -1 where it names none."""
    from toyworld.captions import COLORS, SHAPES, parse_caption

    parsed = [parse_caption(p) for p in prompts]
    color = torch.tensor([COLORS.index(c) if c else -1 for c, _ in parsed], dtype=torch.long)
    shape = torch.tensor([SHAPES.index(s) if s else -1 for _, s in parsed], dtype=torch.long)
    return color, shape


ATTRIBUTE_REWARDS = {"object_alignment": ("color", "shape"), "object_color": ("color",), "object_shape": ("shape",)}
"""Reward name -> the attributes it averages: both, or one (to train a LoRA per attribute and fuse them).
Each also exists as `{name}_soft`, the soft reading's probabilities instead of the exact 0/1."""

SOFT_SUFFIX = "_soft"

_READS = {"object_alignment": "the prompt's colour and shape read back from the object's pixels (exact 0/0.5/1)",
          "object_color": "the prompt's colour read back from the object's pixels (exact 0/1)",
          "object_shape": "the prompt's shape read back from the object's silhouette (exact 0/1)"}


def names_an_attribute(name: str, prompt: str) -> bool:
    """Whether `prompt` names a colour or shape the object reward `name` scores: it scores a prompt that names
    none 0 whatever the image (the training checks refuse prompts that all do)."""
    from toyworld.captions import ATTRIBUTES, parse_caption

    named = dict(zip(ATTRIBUTES, parse_caption(prompt)))
    return any(named[attribute] is not None for attribute in ATTRIBUTE_REWARDS[name.removesuffix(SOFT_SUFFIX)])


def attribute_words(name: str) -> str:
    """What a prompt must name for the object reward `name` to score it, for an error message."""
    from toyworld.captions import COLORS, SHAPES

    words = {"color": f"a colour ({', '.join(COLORS)})", "shape": f"a shape ({', '.join(SHAPES)})"}
    return " or ".join(words[attribute] for attribute in ATTRIBUTE_REWARDS[name.removesuffix(SOFT_SUFFIX)])


def object_reward_names() -> dict[str, str]:
    """Every object reward's registry name -> its one-line description (`texforce rewards list`)."""
    names = {}
    for name, attributes in ATTRIBUTE_REWARDS.items():
        names[name] = f"toy world: {_READS[name]}; soft gradients"
        names[name + SOFT_SUFFIX] = (f"toy world: {name}'s soft reading, the probability of the named "
                                     f"{' and '.join(attributes).replace('color', 'colour')} (in [0,1])")
    return names


class ObjectAlignment:
    """Exact agreement of the image's object with the prompt on `attributes` (module docstring)."""

    differentiable = True

    def __init__(self, name: str = "object_alignment"):
        self.name = name
        self.soft = name.endswith(SOFT_SUFFIX)
        self.attributes = ATTRIBUTE_REWARDS[name.removesuffix(SOFT_SUFFIX)]

    def parts(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Exact per-attribute scores: {"color": [B], "shape": [B]} in {0, 1}, float32 on the images' device."""
        from toyworld.reader import read_objects

        reading = read_objects(images)
        color, shape = _named(prompts)
        return {
            "color": ((reading.color == color) & (color >= 0)).float().to(images.device),
            "shape": ((reading.shape == shape) & (shape >= 0)).float().to(images.device),
        }

    def soft_parts(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Soft per-attribute scores: the probability of the named colour / shape, `[B]` each, differentiable."""
        from toyworld.reader import soft_read

        color_probs, shape_probs = soft_read(images)
        color, shape = (index.to(images.device) for index in _named(prompts))
        pick = torch.arange(len(color), device=images.device)
        zero = torch.zeros_like(color_probs[:, 0])
        return {
            "color": torch.where(color >= 0, color_probs[pick, color.clamp_min(0)], zero),
            "shape": torch.where(shape >= 0, shape_probs[pick, shape.clamp_min(0)], zero),
        }

    def score_with_parts(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(score `[B]`, the exact per-attribute scores of every attribute) from one reading
        (and the soft reading, for a `_soft` reward or when the images require gradients).

        `rewards.Reward` logs the per-attribute scores as parts `{name}_{attribute}`.
        """
        parts = self.parts(images, prompts)
        if self.soft:
            soft_parts = self.soft_parts(images, prompts)
            return torch.stack([soft_parts[a] for a in self.attributes]).mean(0), parts
        exact = torch.stack([parts[a] for a in self.attributes]).mean(0)
        if not (torch.is_grad_enabled() and images.requires_grad):
            return exact, parts
        soft_parts = self.soft_parts(images, prompts)
        soft = torch.stack([soft_parts[a] for a in self.attributes]).mean(0)
        return exact + (soft - soft.detach()), parts  # exact values, soft gradients

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score_with_parts(images, prompts)[0]


def object_reward_builder(name: str):
    """The registry's builder of the object reward `name` (a key of `ATTRIBUTE_REWARDS`)."""

    def build(*, paths=None, device=None, dtype=None) -> ObjectAlignment:
        return ObjectAlignment(name)

    return build
