"""The run directory: what a failed start leaves, and how a local Ray listens."""
import errno
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.run_dir import RunDirectory, pack_learner_state, storage_problem

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_directory_without_progress_is_reused_and_one_with_progress_refused(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "run_name=r"])
    RunDirectory.create(config)  # e.g. the run then failed before its first epoch ended
    run = RunDirectory.create(config)  # the same command, once the problem is fixed
    run.append_metrics({"epoch": 0, "reward_mean": 0.5})
    with pytest.raises(FileExistsError, match="--resume"):
        RunDirectory.create(config)


def test_a_run_directory_holding_only_checkpoints_is_refused(tmp_path):
    """Checkpoints are a run's progress too (its metrics file may be gone): a new run there would write over them."""
    config = load_config(None, [f"output_dir={tmp_path}", "run_name=r"])
    (tmp_path / "r" / "checkpoints" / "epoch_0000").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        RunDirectory.create(config)


def test_a_resumed_epochs_row_replaces_that_epochs_row_and_every_later_one(tmp_path):
    """A resume from epoch_0001's checkpoint writes epoch 2 again: the rows the stopped run wrote for epochs 2 and 3
    go, and the rows stay in epoch order."""
    run = RunDirectory(tmp_path)
    for epoch in range(4):
        run.append_metrics({"epoch": epoch, "reward_mean": 0.1 * epoch})
    rows = run.append_metrics({"epoch": 2, "reward_mean": 0.9})
    assert [(r["epoch"], r["reward_mean"]) for r in run.read_metrics()] == [(0, 0.0), (1, 0.1), (2, 0.9)]
    assert rows == run.read_metrics()


def test_a_checkpoint_folder_without_its_driver_json_is_not_a_checkpoint(tmp_path):
    """driver.json is written last: a folder without it (a save or a copy cut short) is neither the latest checkpoint
    nor counted in the epochs the run has finished."""
    run = RunDirectory(tmp_path)
    for epoch in (0, 1):
        folder = run.checkpoints / f"epoch_{epoch:04d}"
        folder.mkdir(parents=True)
        (folder / "learner.pt").write_bytes(pack_learner_state({"version": epoch}))
    (run.checkpoints / "epoch_0000" / "driver.json").write_text(json.dumps({"epoch": 0}))
    assert run.complete_checkpoints() == [run.checkpoints / "epoch_0000"]
    assert run.latest_checkpoint().name == "epoch_0000" and run.checkpointed_epochs() == 1


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free space there"), (errno.EDQUOT, "free space there"),
                                       (errno.EROFS, "make it writable or write elsewhere")])
def test_a_full_disk_or_quota_asks_for_space_and_a_read_only_one_for_another_place(code: int, fix: str):
    """A quota that is used up is fixed as a full disk is, by freeing space; only a read-only disk needs another place."""
    error = OSError(code, os.strerror(code))
    assert storage_problem(error, "runs/x/metrics.parquet") == f"{os.strerror(code)}: runs/x/metrics.parquet; {fix}"
    assert storage_problem(OSError(errno.EBADF, os.strerror(errno.EBADF)), "runs/x") is None


def test_the_newest_readable_checkpoint_is_loaded(tmp_path, caplog):
    run = RunDirectory(tmp_path)
    for epoch in (0, 1):
        folder = run.checkpoints / f"epoch_{epoch:04d}"
        folder.mkdir(parents=True)
        torch.save({"version": torch.tensor(epoch)}, folder / "learner.pt")
        (folder / "driver.json").write_text(json.dumps({"epoch": epoch, "tracker": {}}))
    bad = run.checkpoints / "epoch_0001" / "learner.pt"
    bad.write_bytes(bad.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="texforce"):
        path, learner_state, driver_state = run.load_latest_checkpoint()
    assert path.name == "epoch_0000" and driver_state["epoch"] == 0 and int(learner_state["version"]) == 0
    assert f"{bad.parent} cannot be read" in caplog.text
    (run.checkpoints / "epoch_0000" / "driver.json").write_text("{not json")
    assert run.load_latest_checkpoint() is None


def test_a_local_ray_listens_on_loopback_only():
    """`texforce train` without an address starts Ray bound to 127.0.0.1, not every interface."""
    script = """
import psutil, ray
from actors.driver import connect_ray
from rl.config import load_config
connect_ray(load_config("configs/tiny.yaml"))  # its actors fit 2 cores: a local Ray starts only for a run it fits
listening = set()
for process in [psutil.Process()] + psutil.Process().children(recursive=True):
    try:
        listening |= {c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except psutil.NoSuchProcess:
        pass
print(sorted(listening))
ray.shutdown()
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    addresses = eval(out.stdout.strip().splitlines()[-1])
    assert addresses, "no listening socket found"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in addresses), addresses


def test_a_packed_learner_state_is_the_checkpoint_file_it_reads_back_from(tmp_path):
    """The learner packs its state into learner.pt's bytes; the driver writes them unopened and a
    resume reads them with weights_only=True."""
    from rl.run_dir import pack_learner_state

    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "generator": torch.Generator().manual_seed(0).get_state(), "version": 3}
    folder = RunDirectory(tmp_path).checkpoints / "epoch_0000"
    folder.mkdir(parents=True)
    (folder / "learner.pt").write_bytes(pack_learner_state(state))
    (folder / "driver.json").write_text(json.dumps({"epoch": 0, "tracker": {}}))
    loaded, _ = RunDirectory.load_checkpoint(folder)
    assert loaded["version"] == 3 and torch.equal(loaded["generator"], state["generator"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


def test_the_reward_curve_draws_each_epochs_mean_within_its_standard_error_and_the_held_out_error_bars(
        tmp_path, saved_figures):
    import numpy as np

    from rl.plots import save_reward_curve

    rows = [{"epoch": 0, "reward_mean": 0.60, "reward_sem": 0.02, "reward_std": 0.3, "num_samples": 64},
            {"epoch": 1, "reward_mean": 0.65, "reward_sem": 0.01, "reward_std": 0.3, "num_samples": 64},
            {"epoch": 2, "reward_mean": 0.70, "reward_sem": None, "reward_std": 0.4, "num_samples": 16}]  # std / 4
    held_out = [{"epoch": -1, "reward_mean": 0.50, "reward_sem": 0.005}, {"epoch": 2, "reward_mean": 0.55,
                                                                         "reward_sem": 0.007}]
    save_reward_curve(rows, tmp_path / "curve.png", title="my run", held_out=held_out)
    (ax,) = saved_figures[0].axes
    assert ax.get_title() == "my run"
    mean = ax.lines[0]
    assert list(mean.get_xdata()) == [0, 1, 2] and np.allclose(mean.get_ydata(), [0.60, 0.65, 0.70])
    # the band: mean -+ one standard error at each epoch, on both sides
    (band,) = ax.collections[:1]
    vertices = band.get_paths()[0].vertices
    for epoch, low, high in [(0, 0.58, 0.62), (1, 0.64, 0.66), (2, 0.60, 0.80)]:
        at = vertices[np.isclose(vertices[:, 0], epoch), 1]
        assert np.isclose(at.min(), low) and np.isclose(at.max(), high), (epoch, at)
    # the held-out points at their epochs (-1: before training), each bar its standard error
    (held_out_bars,) = ax.containers
    points, _, (bars,) = held_out_bars
    assert list(points.get_xdata()) == [-1, 2] and np.allclose(points.get_ydata(), [0.50, 0.55])
    assert np.allclose([segment[:, 1] for segment in bars.get_segments()], [[0.495, 0.505], [0.543, 0.557]])


def test_the_reward_curve_draws_the_held_out_evaluations_and_is_redrawn_after_one(tmp_path):
    import numpy as np
    from PIL import Image

    from rl.outputs import EpochOutputs

    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    outputs = EpochOutputs(run, title="curve")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for epoch in range(3):
        row = {"epoch": epoch, "reward_mean": 0.6 + 0.01 * epoch, "reward_std": 0.3, "num_samples": 256}
        outputs.write(row, images, ["a", "b"])
    outputs.flush()

    def orange_pixels() -> int:  # matplotlib's tab:orange (255, 127, 14): only the held-out series
        rgb = np.asarray(Image.open(run.reward_curve).convert("RGB")).astype(int)
        return int((np.abs(rgb - [255, 127, 14]).sum(-1) < 30).sum())

    assert orange_pixels() == 0
    for epoch, mean in [(-1, 0.52), (2, 0.54)]:
        run.append_evaluation({"epoch": epoch, "reward_mean": mean, "reward_sem": 0.008})
    outputs.redraw_curve()
    outputs.close()
    assert orange_pixels() > 50


def test_an_image_grid_tiles_the_images_row_by_row_each_caption_under_its_own_image(tmp_path):
    """Small images upscaled to at least min_size (40 px -> 5 x 40 = 200 >= 192), two per row, each caption wrapped
    under its own tile; float images as they round to uint8."""
    import numpy as np
    from PIL import Image

    from rl.plots import save_image_grid

    colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=torch.uint8)
    images = colours.view(3, 3, 1, 1).expand(3, 3, 40, 40).contiguous()
    captions = [" ".join(["a red ball on the grass"] * 4), "", "a blue car"]  # the first wraps onto several lines
    grid = np.asarray(Image.open(save_image_grid(images, captions, tmp_path / "grid.png", columns=2)).convert("RGB"))
    cell = 200
    text_h = grid.shape[0] // 2 - cell
    assert grid.shape == (2 * (cell + text_h), 2 * cell, 3) and text_h > 12
    dark = (grid < 100).all(-1)  # the black caption text
    for i, colour in enumerate(colours.tolist()):
        x, y = (i % 2) * cell, (i // 2) * (cell + text_h)
        assert (grid[y:y + cell, x:x + cell] == colour).all()
        assert dark[y + cell:y + cell + text_h, x:x + cell].any() == bool(captions[i])
    assert (grid[cell + text_h:, cell:] == 255).all()  # no fourth image: white
    # the same images as floats in [0, 1], each value 0.4 / 255 below its byte: rounded to it, not truncated below
    as_uint8 = torch.randint(1, 256, (3, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pngs = [np.asarray(Image.open(save_image_grid(x, ["a", "b", "c"], tmp_path / f"{x.dtype}.png")))
            for x in ((as_uint8.float() - 0.4) / 255, as_uint8)]
    assert np.array_equal(*pngs) and pngs[0].shape[1] == 3 * cell  # 3 images, up to 4 columns: one row of 3


def test_epochs_written_without_plots_get_their_metrics_and_a_stopped_run_its_whole_curve(tmp_path, monkeypatch):
    """plot_every: an epoch without plots still gets its metrics row and TensorBoard scalars, no grid; closing
    after such an epoch redraws the curve, so it shows every epoch written."""
    import rl.outputs
    from rl.outputs import EpochOutputs

    drawn: list[int] = []
    draw = rl.outputs.save_reward_curve
    monkeypatch.setattr(rl.outputs, "save_reward_curve", lambda rows, *a, **k: drawn.append(len(rows)) or draw(rows, *a, **k))
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    outputs = EpochOutputs(run, title="curve")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for epoch, plots in enumerate([True, False, False]):
        row = {"epoch": epoch, "reward_mean": 0.6, "reward_std": 0.3, "num_samples": 8}
        outputs.write(row, images, ["a", "b"], plots=plots)
    outputs.flush()
    assert drawn == [1] and sorted(p.name for p in run.grids.iterdir()) == ["epoch_0000.png"]
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1, 2] and any(run.tensorboard.iterdir())
    outputs.close()
    assert drawn == [1, 3]


def test_auto_plots_wait_for_a_drawing_underway_but_not_for_epochs_written_without_one(tmp_path):
    """plot_every: auto asks `plots_due` each epoch: no while a drawing is still queued (else drawings pile up behind
    a slow one), and epochs written without plots leave nothing to wait for."""
    from rl.outputs import EpochOutputs

    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    outputs = EpochOutputs(run, title="curve")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    release = threading.Event()
    try:
        outputs.write({"epoch": 0, "reward_mean": 0.6, "reward_std": 0.3, "num_samples": 8}, images, ["a", "b"],
                      plots=False)
        outputs.flush()
        assert outputs.plots_due()  # nothing drawn yet: the first drawing is due
        outputs.executor.submit(release.wait)  # the drawing thread busy: epoch 1's drawing stays queued
        outputs.write({"epoch": 1, "reward_mean": 0.6, "reward_std": 0.3, "num_samples": 8}, images, ["a", "b"])
        assert not outputs.plots_due()
    finally:
        release.set()
        outputs.close()


def test_plot_every_auto_draws_while_drawing_stays_within_its_share_of_the_run():
    """plot_every: auto. A drawing of 0.1 s in one-second epochs: the first epoch, then about every 10th (the
    metrics row is written every epoch besides); in 20-second epochs every one."""
    from rl.outputs import PLOT_TIME_SHARE, plots_due

    def drawn(epoch_seconds: float, cost: float = 0.1, epochs: int = 100) -> list[int]:
        spent, done = 0.0, []
        for epoch in range(epochs):
            if plots_due(spent, len(done), (epoch + 1) * epoch_seconds):
                spent += cost
                done.append(epoch)
        return done

    assert PLOT_TIME_SHARE == 0.01
    one_second = drawn(1.0)
    gaps = [b - a for a, b in itertools.pairwise(one_second)]
    assert one_second[0] == 0 and 19 <= gaps[0] <= 20 and all(9 <= gap <= 11 for gap in gaps[1:])
    assert len(one_second) in (9, 10)  # within the share of the run: 1 s of 100
    assert drawn(20.0) == list(range(100))
    assert drawn(1.0, cost=0.0) == list(range(100))  # free drawing: every epoch
