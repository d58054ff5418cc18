"""Pictures people look at: image grids with prompts and rewards, and the reward curve."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rl.sampling import images_to_uint8


def save_image_grid(
    images: torch.Tensor, captions: list[str], path: str | Path, *, columns: int = 4, min_size: int = 192
) -> Path:
    """Tile uint8 images [B, 3, H, W] with a caption under each; upscale small images for reading."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = images_to_uint8(images)
    b, _, h, w = images.shape
    scale = max(1, int(np.ceil(min_size / max(h, w))))
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, width=max(12, cell_w // 7)) or [""] for c in captions]
    text_h = 12 * max(len(x) for x in lines) + 6
    columns = min(columns, b)
    rows = int(np.ceil(b / columns))
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        tile = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((cell_w, cell_h), Image.NEAREST)
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        grid.paste(tile, (x, y))
        for k, line in enumerate(lines[i]):
            draw.text((x + 3, y + cell_h + 3 + 12 * k), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_reward_curve(epochs: list[int], means: list[float], stds: list[float], path: str | Path, *, title: str) -> Path:
    """Mean reward per epoch with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs_arr, mean, std = np.asarray(epochs), np.asarray(means), np.asarray(stds)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(epochs_arr, mean, marker="o", label="mean reward")
    ax.fill_between(epochs_arr, mean - std, mean + std, alpha=0.2, label="+-1 std")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
