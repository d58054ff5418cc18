"""Prompt sets: a file with one prompt per line, or an embedded set that needs no download."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rl.config import PromptConfig

COLORS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple"]
_OBJECTS = ["ball", "car", "house", "flower", "apple", "bird", "cup", "hat"]
_ANIMALS = ["cat", "dog", "bird", "horse", "fish", "dragon"]
_ACTIVITIES = ["sitting in a field", "in the city", "on the grass", "in a forest", "by the sea"]

BUILTIN = {
    "colors": [f"a {color} {obj}" for color in COLORS for obj in _OBJECTS],
    "animals": [f"a photo of a {a} {act}" for a in _ANIMALS for act in _ACTIVITIES],
}


def load_prompts(config: PromptConfig) -> list[str]:
    """The prompt list named by the config; an empty or missing file is an error."""
    if config.file is None:
        return list(BUILTIN[config.builtin])
    path = Path(config.file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (prompts.file); one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def epoch_prompts(
    prompts: list[str], *, seed: int, epoch: int, num_samples: int, group_size: int = 1
) -> tuple[list[str], list[int]]:
    """This epoch's prompts and per-sample noise seeds, a pure function of (seed, epoch).

    With group_size k, num_samples/k prompts are drawn and each is repeated k times in a row.
    """
    rng = np.random.default_rng([seed, epoch])
    drawn = rng.choice(len(prompts), size=num_samples // group_size, replace=True)
    chosen = [prompts[i] for i in drawn for _ in range(group_size)]
    seeds = rng.integers(0, 2**31 - 1, size=num_samples).tolist()
    return chosen, seeds
