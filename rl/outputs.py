"""An epoch's outputs (metrics row in parquet and TensorBoard, image grid, reward curve), written
off the training loop's critical path but for the metrics row.

One background thread writes TensorBoard, the grid and the curve in epoch order, so the driver starts the next
update as soon as an epoch's update is back instead of waiting on PNG encoding and matplotlib. A
failed write is raised in the driver at the next epoch's `write` or at `close`, which waits for
everything queued (the run's files are complete when `train` returns or stops).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rl.plots import load_pyplot, save_image_grid, save_reward_curve
from rl.run_dir import RunDirectory


# `plot_every: auto` draws the grid and the curve while the time spent drawing them stays within this
# share of the run's time: every epoch where epochs take a few seconds or more, about every 10th where they
# take one second (a drawing is ~0.1 s on 2 CPU cores). On 2 busy cores the drawing thread's time comes out
# of the epoch; the metrics row and TensorBoard (~5 ms) are written every epoch besides.
PLOT_TIME_SHARE = 0.01


def plots_due(drawing_seconds: float, drawings: int, run_seconds: float, share: float = PLOT_TIME_SHARE) -> bool:
    """Whether one more drawing, at the mean cost of the `drawings` so far, keeps the time spent drawing within
    `share` of `run_seconds`. The first is due: it shows the run's start and measures the cost."""
    return drawings == 0 or drawing_seconds * (drawings + 1) / drawings <= share * run_seconds


class EpochOutputs:
    def __init__(self, run: RunDirectory, *, title: str):
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.title = run, title
        self.started = time.perf_counter()
        # written by the drawing thread: what the grids and curves drawn so far took
        self.drawing_seconds, self.drawings = 0.0, 0
        self.queued_drawings = 0
        self.writer = SummaryWriter(str(run.tensorboard))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-outputs")
        # matplotlib's first import (about a second) happens here, while the first epoch samples
        self.pending: list[Future] = [self.executor.submit(load_pyplot)]
        self.curve_behind = False  # the last epoch written skipped the curve

    def write(self, row: dict, images: torch.Tensor | None, captions: list[str], *, plots: bool = True) -> None:
        """Write epoch `row["epoch"]`'s metrics row, and queue its other outputs: images [N, 3, H, W] uint8 with their
        captions go to the grid (None: no grid). plots=False: TensorBoard only, no grid and no curve (`plot_every`).

        The row is written here, not in the background (a few ms): the driver checkpoints the epoch next, and a run
        resumed from a checkpoint whose row a full disk had lost would never write that row."""
        self._raise_failed()
        rows = self.run.append_metrics(row)
        self.curve_behind = not plots
        self.queued_drawings += plots
        images = images.clone() if plots and images is not None else None
        self.pending.append(self.executor.submit(self._write, dict(row), rows, images, list(captions), plots))

    def plots_due(self) -> bool:
        """`plot_every: auto`: no drawing is still underway, and one more keeps drawing within PLOT_TIME_SHARE
        of the run's time so far."""
        return self.drawings == self.queued_drawings and plots_due(
            self.drawing_seconds, self.drawings, time.perf_counter() - self.started)

    def _write(self, row: dict, rows: list[dict], images: torch.Tensor | None, captions: list[str],
               plots: bool) -> None:
        epoch = row["epoch"]
        self._add_scalars(row, epoch)
        if plots:
            t0 = time.perf_counter()
            if images is not None:
                save_image_grid(images, captions, self.run.grids / f"epoch_{epoch:04d}.png")
            self._draw_curve(rows)
            self.drawing_seconds += time.perf_counter() - t0
            self.drawings += 1

    def redraw_curve(self) -> None:
        """Queue a redraw of the reward curve, e.g. after a held-out evaluation was appended."""
        self._raise_failed()
        self.curve_behind = False
        self.pending.append(self.executor.submit(lambda: self._draw_curve(self.run.read_metrics())))

    def write_evaluation(self, row: dict | None) -> None:
        """Queue a held-out evaluation's row (evaluation.parquet's) for TensorBoard, as `held_out/<key>` at step
        epochs trained (0: the base model), then the reward curve with its point. None (no evaluation): nothing."""
        if row is None:
            return
        self._raise_failed()
        step = row["epoch"] + 1
        scalars = {key: value for key, value in row.items()
                   if key.startswith("reward_") and key != "reward_spec" and value is not None}
        self.pending.append(self.executor.submit(self._add_scalars, scalars, step, prefix="held_out/"))
        self.redraw_curve()

    def _add_scalars(self, scalars: dict, step: int, *, prefix: str = "") -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(prefix + key, value, step)

    def _draw_curve(self, rows: list[dict]) -> None:
        save_reward_curve(rows, self.run.reward_curve, title=self.title, held_out=self.run.read_evaluations())

    def _raise_failed(self) -> None:
        done = [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if not f.done()]
        for future in done:
            future.result()  # re-raises a failed write here, in the driver

    def flush(self) -> None:
        """Wait until everything queued is written."""
        for future in self.pending:
            future.result()
        self.pending = []

    def close(self) -> None:
        try:
            if self.curve_behind:  # a run stopped between two plotted epochs: its curve shows every epoch
                self.redraw_curve()
            self.flush()
        finally:
            self.executor.shutdown(wait=True)
            self.writer.close()
