"""Pictures people look at: image grids with prompts and rewards, and the reward curve."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rl.run_dir import epoch_reward_sem
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
    grid.save(path, compress_level=1)  # a third of the default level's time, 5% larger
    return path


def load_pyplot():
    """matplotlib.pyplot on the Agg backend (files only, safe off the main thread); the first call imports it,
    about a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_reward_curve(metrics: list[dict], path: str | Path, *, title: str, held_out: Sequence[dict] = ()) -> Path:
    """Mean training reward per epoch with its +-1 standard error, and the held-out evaluations
    (evaluation.parquet rows, epoch -1 = before training) with theirs.

    The band is the standard error of each epoch's mean, not the spread of single rewards: the
    question the plot answers is whether the mean moved, and a +-1 std band of 0/0.5/1 rewards
    would hide any change smaller than the whole axis.
    """
    plt = load_pyplot()
    epochs = np.asarray([r["epoch"] for r in metrics])
    mean = np.asarray([r["reward_mean"] for r in metrics])
    sem = np.asarray([epoch_reward_sem(r) for r in metrics])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(epochs, mean, marker="o", label="training batch mean")
    ax.fill_between(epochs, mean - sem, mean + sem, alpha=0.2, label="+-1 standard error")
    if held_out:
        ax.errorbar([r["epoch"] for r in held_out], [r["reward_mean"] for r in held_out],
                    yerr=[r["reward_sem"] for r in held_out], marker="s", capsize=3, color="tab:orange",
                    label="held-out prompts (epoch -1: before training)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path
