"""The run directory: what a failed start leaves, and how a local Ray listens."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_directory_without_progress_is_reused_and_one_with_progress_refused(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "run_name=r"])
    RunDirectory.create(config)  # e.g. the run then failed before its first epoch ended
    run = RunDirectory.create(config)  # the same command, once the problem is fixed
    run.append_metrics({"epoch": 0, "reward_mean": 0.5})
    with pytest.raises(FileExistsError, match="--resume"):
        RunDirectory.create(config)


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
