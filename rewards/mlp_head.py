"""The linear score head shared by ImageReward and the LAION aesthetic predictor.

Both official heads are `nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout,
Linear, Linear)` with the ReLUs commented out, so their state dicts hold `layers.{0,2,4,6,7}`.
We rebuild the same indices (dropout is the identity at eval) with sizes read from the file.
"""
from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from rewards.checkpoint import load_strict, reject_unmapped

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class LinearStack(nn.Module):
    """`[B,D] -> [B,1]` through the Linear layers at the indices found in the checkpoint."""

    def __init__(self, shapes: dict[int, tuple[int, int]]):
        super().__init__()
        n = max(shapes) + 1
        self.layers = nn.Sequential(
            *[nn.Linear(shapes[i][1], shapes[i][0]) if i in shapes else nn.Identity() for i in range(n)]
        )

    @property
    def in_features(self) -> int:
        return next(m for m in self.layers if isinstance(m, nn.Linear)).in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def linear_stack_from_state_dict(state_dict: dict[str, torch.Tensor], *, path: Path, what: str) -> LinearStack:
    """Build and strictly load a `LinearStack` from keys `layers.{i}.weight/bias`."""
    reject_unmapped([k for k in state_dict if not _LAYER_KEY.match(k)], path=path, what=what)
    shapes = {int(_LAYER_KEY.match(k).group(1)): tuple(v.shape) for k, v in state_dict.items()
              if k.endswith(".weight")}
    if not shapes or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"{path} has no 2-D `layers.N.weight` tensors; expected {what}")
    order = sorted(shapes)
    for a, b in pairwise(order):
        if shapes[a][0] != shapes[b][1]:
            raise ValueError(f"{path}: layers.{a} outputs {shapes[a][0]} but layers.{b} takes {shapes[b][1]}")
    if shapes[order[-1]][0] != 1:
        raise ValueError(f"{path}: the last layer outputs {shapes[order[-1]][0]} values, expected 1 ({what})")
    head = LinearStack(shapes)
    load_strict(head, state_dict, path=path, what=what)
    return head
