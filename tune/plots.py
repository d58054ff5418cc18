"""The objective over the alphas: a line for one LoRA, a heat map for two, per-alpha scatters for more."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rl.plots import load_pyplot


def plot_objective(
    points: np.ndarray,
    objective: np.ndarray,
    path: str | Path,
    *,
    names: list[str],
    title: str = "",
    background: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Plot trial objectives; points: [T, N] alphas, objective: [T].

    Two LoRAs: a heat map over (alpha_1, alpha_2) -- `background` (a1 [K], a2 [M], Z [K, M])
    when given (e.g. a dense grid), else interpolated between the trials -- with the trials
    marked and the best starred. One LoRA: objective against alpha. More: one scatter per alpha.
    """
    plt = load_pyplot()
    points, objective = np.asarray(points, dtype=float), np.asarray(objective, dtype=float)
    best = int(np.argmax(objective))
    n = points.shape[1]
    if n == 2 and (background is not None or _spans_plane(points)):
        fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=100)
        if background is not None:
            a1, a2, z = background
            mesh = ax.pcolormesh(a1, a2, np.asarray(z).T, shading="nearest", cmap="viridis")
        else:
            mesh = ax.tricontourf(points[:, 0], points[:, 1], objective, levels=14, cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="objective")
        ax.scatter(points[:, 0], points[:, 1], c="white", edgecolors="black", s=22, label="trials")
        ax.scatter(*points[best], marker="*", s=220, c="red", edgecolors="black", label="best trial")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    else:
        cols = max(1, n)
        fig, axes = plt.subplots(1, cols, figsize=(3.6 * cols, 3.2), dpi=100, squeeze=False)
        for i, ax in enumerate(axes[0]):
            order = np.argsort(points[:, i])
            if n == 1:
                ax.plot(points[order, i], objective[order], color="0.6", zorder=1)
            sc = ax.scatter(points[:, i], objective, c=objective, cmap="viridis", s=22, zorder=2)
            ax.scatter(points[best, i], objective[best], marker="*", s=200, c="red", edgecolors="black", zorder=3)
            ax.set_xlabel(names[i])
            ax.set_ylabel("objective")
            ax.grid(alpha=0.3)
        if n > 1:
            fig.colorbar(sc, ax=axes[0].tolist(), label="objective")
    fig.suptitle(f"objective {title}".strip(), fontsize=10, y=1.04 if n == 2 else 0.98)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _spans_plane(points: np.ndarray) -> bool:
    """At least three trials not on one line (a triangulation exists)."""
    if len(points) < 3:
        return False
    centered = points - points.mean(0)
    return np.linalg.matrix_rank(centered, tol=1e-9) == 2
