"""The toy world's words: colours, shapes, the caption grammar and the train / held-out split.

A caption is "a {color} {shape}", e.g. "a magenta car". The 10 x 8 = 80 combinations are
split once, by a fixed rule, into 60 train and 20 held-out combinations: colour i holds out
shapes (3i) mod 8 and (3i + 4) mod 8. Every colour keeps 6 shapes in training and every shape
7 or 8 colours, so each word is learnt, while the held-out pairs test whether the model (and
what RL does to it) composes words it knows into pairs it never saw.
"""
from __future__ import annotations

import re

COLORS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple"]
SHAPES = ["ball", "car", "house", "flower", "apple", "bird", "cup", "hat"]
ATTRIBUTES = ("color", "shape")  # what a caption names, in the order `parse_caption` returns them

_COLOR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


def caption(color: str, shape: str) -> str:
    """The caption of one object: "a {color} {shape}"."""
    return f"a {color} {shape}"


def parse_caption(prompt: str) -> tuple[str | None, str | None]:
    """(colour, shape) named in a prompt: the first world colour and shape word, None where absent.

    Case-insensitive and word-bounded, so "a Red ball on the grass" -> ("red", "ball") and
    "a reddish balloon" -> (None, None).
    """
    text = prompt.lower()
    color, shape = _COLOR_WORD.search(text), _SHAPE_WORD.search(text)
    return (color.group(1) if color else None), (shape.group(1) if shape else None)


def held_out_combinations() -> list[tuple[str, str]]:
    """The 20 (colour, shape) pairs never used for training, in colour order (module docstring)."""
    pairs = []
    for i, color in enumerate(COLORS):
        held = sorted({(3 * i) % len(SHAPES), (3 * i + 4) % len(SHAPES)})
        pairs += [(color, SHAPES[j]) for j in held]
    return pairs


def train_combinations() -> list[tuple[str, str]]:
    """The 60 (colour, shape) pairs scenes and fine-tuning may use, colour-major order."""
    held = set(held_out_combinations())
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]


def all_combinations() -> list[tuple[str, str]]:
    """All 80 (colour, shape) pairs, colour-major order."""
    return [(c, s) for c in COLORS for s in SHAPES]


def prompts_for(combinations: list[tuple[str, str]]) -> list[str]:
    """The captions of `combinations`, in their order (a prompt set, one per pair)."""
    return [caption(c, s) for c, s in combinations]
