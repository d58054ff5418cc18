"""Advantages from rewards: per-prompt running statistics (DDPO), GRPO-style groups, or the batch.

All functions take rewards as a float numpy array [B] and return advantages [B], already
clipped to [-adv_clip_max, adv_clip_max].
"""
from __future__ import annotations

from collections import deque

import numpy as np

EPS = 1e-6


def normalize(rewards: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (rewards - mean) / (std + EPS)


class PerPromptStatTracker:
    """Running reward mean/std per prompt over the last `buffer_size` rewards.

    A prompt with fewer than `min_count` rewards in its history (this batch included) is
    normalised with the whole batch's mean/std instead, so early epochs are not noise-driven.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add this batch to the history and return its advantages [B]."""
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        prompts_arr = np.asarray(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            history = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(rewards[mask].tolist())
            if len(history) < self.min_count:
                mean, std = rewards.mean(), rewards.std()
            else:
                mean, std = np.mean(history), np.std(history)
            advantages[mask] = normalize(rewards[mask], mean, std)
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "history": {p: list(h) for p, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.history = {p: deque(h, maxlen=self.buffer_size) for p, h in state["history"].items()}


def group_advantages(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """GRPO-style: normalise each reward within the samples of the same prompt in this batch.

    A prompt left with a single sample (its group-mates dropped) gets advantage 0.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages = np.zeros_like(rewards)
    prompts_arr = np.asarray(prompts, dtype=object)
    for prompt in dict.fromkeys(prompts):
        mask = prompts_arr == prompt
        advantages[mask] = normalize(rewards[mask], rewards[mask].mean(), rewards[mask].std())
    return advantages


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    return normalize(rewards, rewards.mean(), rewards.std())


def compute_advantages(
    prompts: list[str], rewards: np.ndarray, *, mode: str, adv_clip_max: float, tracker: PerPromptStatTracker | None
) -> np.ndarray:
    """Dispatch on `mode` (per_prompt | group | batch), then clip."""
    if mode == "per_prompt":
        if tracker is None:
            raise ValueError("per_prompt advantages need a PerPromptStatTracker")
        advantages = tracker.update(prompts, rewards)
    elif mode == "group":
        advantages = group_advantages(prompts, rewards)
    elif mode == "batch":
        advantages = batch_advantages(rewards)
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; use per_prompt, group or batch")
    return np.clip(advantages, -adv_clip_max, adv_clip_max).astype(np.float32)
