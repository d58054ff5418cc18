"""`texforce tune`: a Ray Tune sweep over the alphas finds (near) the best point of a dense grid.

Landscape: on the tiny model, LoRA A (U-Net conv_in/conv_out) raises `color_alignment` and
LoRA B (the negation of a conv_out LoRA) lowers it, so the best alphas use A and not B
(alpha_B = 0). Evaluation is deterministic (fixed seeds, eta 0), so the sweep's best trial
is compared with a dense 9x9 grid on [0, 2]^2 evaluated by the same function in-process.
Tolerance: the sweep's best objective is within 5% of the grid's objective range of the
grid's best.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from lora_fixtures import make_lora

from rl.config import ConfigError
from tune.evaluate import EvalSettings
from tune.fusion import fuse_files
from tune.sweep import (
    SweepSettings,
    alphas_at_alpha_max,
    anchor_points,
    best_first,
    config_alphas,
    resolve_search,
    simplex_grid,
)
from tune.worker import FusionJob, evaluate_alphas

PROMPTS = ("a red ball", "a blue car", "a green tree", "a yellow house")
SETTINGS = EvalSettings(num_seeds=1, num_steps=4, guidance_scale=5.0, eta=0.0, batch_size=4)
ALPHA_MAX = 2.0
ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.05  # of the dense grid's objective range


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def directed_loras(tiny_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-loras")
    up = make_lora(tiny_sd_dir, root / "up", rank=4, alpha=4, seed=2, policy="unet", scale=0.3,
                   unet_targets=["conv_out", "conv_in"])
    other = make_lora(tiny_sd_dir, root / "other", rank=4, alpha=4, seed=4, policy="unet", scale=1.0,
                      unet_targets=["conv_out"])
    down = fuse_files([other], [-1.0]).save(root / "down.safetensors")
    return str(up), str(down)


@pytest.fixture(scope="module")
def job(tiny_sd_dir, directed_loras):
    return FusionJob(model=tiny_sd_dir, loras=directed_loras, prompts=PROMPTS, reward="color_alignment",
                     settings=SETTINGS, device="cpu")


def _objective(job, alphas):
    return float(evaluate_alphas(job, alphas).objective.mean())


def test_the_loras_push_the_reward_in_known_directions(job):
    base = _objective(job, [0.0, 0.0])
    assert _objective(job, [1.0, 0.0]) > base + 2e-3  # A raises color_alignment
    assert _objective(job, [0.0, 1.0]) < base - 2e-3  # B lowers it


def test_sweep_finds_alphas_near_the_best_of_a_dense_grid(ray_session, job, tiny_sd_dir, directed_loras, tmp_path,
                                                           capsys):
    from rl.cli import main

    grid = np.linspace(0.0, ALPHA_MAX, 9)
    dense = np.array([[_objective(job, [a, b]) for b in grid] for a in grid])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "sweep"
    argv = ["tune", "--model", tiny_sd_dir, "--lora", directed_loras[0], "--lora", directed_loras[1],
            "--prompts", str(prompts), "--objective", "color_alignment", "--num-samples", "14",
            "--alpha-max", str(ALPHA_MAX), "--search", "random", "--search-seed", "0", "--seeds", "1",
            "--steps", "4", "--batch-size", "4", "--device", "cpu", "--cpus-per-trial", "1",
            "--max-concurrent", "2", "--out", str(out)]
    assert main(argv) == 0

    rows = pq.read_table(out / "results.parquet").to_pylist()
    best = json.loads((out / "best.json").read_text())
    assert len(rows) == 14 and best["objective"] == max(r["objective"] for r in rows)
    gap = (dense.max() - best["objective"]) / (dense.max() - dense.min())
    print(f"grid best {dense.max():.5f} at {np.unravel_index(dense.argmax(), dense.shape)}, grid range "
          f"{dense.max() - dense.min():.5f}; sweep best {best['objective']:.5f} at {best['alphas']}; gap {gap:.3f}")
    assert gap <= TOLERANCE
    # the trial's number is the in-process evaluation's number for the same alphas
    assert abs(_objective(job, best["alphas"]) - best["objective"]) < 1e-6
    # reward models and pipelines are loaded once per worker process, not once per trial
    assert all(r["pipeline_loads"] == 1 and r["reward_loads"] == 1 for r in rows)
    assert len({r["worker_pid"] for r in rows}) < len(rows)
    assert (out / "best_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "objective.png").stat().st_size > 5000
    printed = capsys.readouterr().out
    assert best["at_alpha_max"] == [] and "top of the box" not in printed  # best at alpha_1 ~1.6
    # one line per trial, numbered 1-14 of 14, and none of Tune's own console output
    numbers = [line.split()[1] for line in printed.splitlines() if line.startswith("trial ")]
    assert sorted(numbers, key=lambda n: int(n.split("/")[0])) == [f"{i}/14" for i in range(1, 15)]
    assert "Configuration for experiment" not in printed and "tensorboard --logdir" not in printed

    # in a box too small for it, the LoRA that raises the reward is best at the top face: the sweep says so
    small = ["--alpha-max", "0.5", "--search", "grid", "--grid", "2", "--out", str(tmp_path / "small")]
    assert main([*argv[:5], *argv[7:], *small]) == 0  # the raising LoRA alone; the last --alpha-max, --search win
    assert json.loads((tmp_path / "small" / "best.json").read_text())["at_alpha_max"] == ["alpha_1"]
    assert "note: the best trial has alpha_1 at the top of the box (--alpha-max 0.5)" in capsys.readouterr().out

    # a normalized grid runs each direction once: 3 points, not the 9 of the box (3 of them (0.5, 0.5))
    normalized = ["--search", "grid", "--grid", "3", "--normalize", "--out", str(tmp_path / "normalized")]
    assert main([*argv, *normalized]) == 0  # --grid with --search random is refused (test_tune_checks_its_input...)
    rows = pq.read_table(tmp_path / "normalized" / "results.parquet").to_pylist()
    assert sorted((r["alpha_1"], r["alpha_2"]) for r in rows) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert "trial   3/3  " in capsys.readouterr().out


def _drivers_own(stderr: str) -> str:
    """stderr without the lines Ray forwards from the trials' worker processes ("(_trial pid=N) ..."): when Ray shuts
    down, a worker that its SIGTERM reaches inside a weakref callback prints Ray's SystemExit as "Exception ignored"
    with a traceback (rarely: seen in this test in 2026-12 runs); what the trials did is read from the outputs."""
    return "\n".join(line for line in stderr.splitlines() if "(_trial pid=" not in line)


def _start_grid_sweep(tiny_sd_dir, loras, tmp_path, *, prompts, grid: int) -> tuple[subprocess.Popen, Path, dict]:
    """`texforce tune` over a GRID x GRID grid of two LoRAs, one trial at a time on a local Ray of its own (not the
    session's), in a process of its own; returns the process, the sweep's --out and the environment it runs in."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts))
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "tune.cli", "tune", "--model", tiny_sd_dir, "--lora", loras[0],
               "--lora", loras[1], "--prompts", str(prompts_file), "--objective", "color_alignment",
               "--grid", str(grid), "--alpha-max", "2", "--seeds", "1", "--steps", "2", "--device", "cpu",
               "--max-concurrent", "1", "--num-cpus", "1", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, out, env


def test_ctrl_c_keeps_the_finished_trials_and_resume_runs_the_rest(tiny_sd_dir, directed_loras, tmp_path):
    """Tune catches SIGINT and stops its trials; `texforce tune` writes what the finished ones found, says how many of
    how many finished, and exits 130 (it ended in a KeyError traceback: trials cut short have no metrics).
    `--resume` then runs the rest of the grid, keeps the finished trials without running them again, and writes
    the outputs of the whole sweep."""
    process, out, env = _start_grid_sweep(tiny_sd_dir, directed_loras, tmp_path, prompts=PROMPTS, grid=4)
    try:
        for line in process.stdout:  # trials 1 and 2 have ended (one at a time): the sweep is running
            if line.startswith("trial   3"):
                break
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in _drivers_own(stderr), stderr
    assert "Tuner.restore" not in stderr  # Tune's own hint, for its Python API: texforce says `--resume`
    first = pq.read_table(out / "results.parquet").to_pylist()
    assert 3 <= len(first) < 16 and all(np.isfinite(r["objective"]) for r in first)
    assert stderr.strip().splitlines()[-1] == (f"texforce tune: interrupted after {len(first)} of 16 trials; the "
                                               f"outputs are theirs; continue with `texforce tune --resume {out}`")
    best = json.loads((out / "best.json").read_text())
    assert best["objective"] == max(r["objective"] for r in first)

    resumed = subprocess.run([sys.executable, "-m", "tune.cli", "tune", "--resume", str(out), "--num-cpus", "1"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0 and "Traceback" not in _drivers_own(resumed.stderr), resumed.stderr
    rows = pq.read_table(out / "results.parquet").to_pylist()
    grid = {(a, b) for a in (0.0, 2 / 3, 4 / 3, 2.0) for b in (0.0, 2 / 3, 4 / 3, 2.0)}
    assert len(rows) == 16 and {(round(r["alpha_1"], 6), round(r["alpha_2"], 6)) for r in rows} == {
        (round(a, 6), round(b, 6)) for a, b in grid}
    # a trial Tune had marked ended is kept, not run again: the same row, from the same worker process; one
    # that had reported but not yet ended when SIGINT came runs again
    kept = [row for row in first if row in rows]
    ran = [line for line in resumed.stdout.splitlines() if line.startswith("trial ")]
    assert len(kept) >= 2 and len(ran) == 16 - len(kept) and ran[0].startswith(f"trial {len(kept) + 1:3d}"), ran
    best = json.loads((out / "best.json").read_text())
    assert best["objective"] == max(r["objective"] for r in rows) and best["num_trials"] == 16


def _trial_workers(pid: int) -> list:
    """The Tune trial actors' processes under process `pid` (Ray titles them `ray::ImplicitFunc`)."""
    import psutil

    found = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone since it was listed
            pass
    return found


def test_a_trial_whose_worker_dies_leaves_the_others_outputs_and_resume_runs_it_again(tiny_sd_dir, directed_loras,
                                                                                    tmp_path):
    """The first trial's worker is killed before it reports (as the OOM killer or a lost node does): the other trials
    run on, the finished ones' outputs are written, one line says what failed and that `--resume` runs it again
    (exit 1: not the user's error), and the resume does (it ended in a traceback with no outputs)."""
    process, out, env = _start_grid_sweep(tiny_sd_dir, directed_loras, tmp_path, prompts=PROMPTS[:2], grid=3)
    try:
        # the first trial's actor: it imports torch and diffusers and loads the pipeline before it can report
        while not (workers := _trial_workers(process.pid)):
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.05)
        for worker in workers:
            worker.kill()
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == 8 and (0.0, 0.0) not in {(r["alpha_1"], r["alpha_2"]) for r in rows}  # the first trial's
    assert json.loads((out / "best.json").read_text())["num_trials"] == 8
    assert process.returncode == 1, stderr[-3000:]
    assert re.fullmatch(
        r"texforce tune: 8 of 9 trials finished, 1 failed \(the first: The actor died unexpectedly before finishing "
        r"this task; Tune's report: .*/error\.txt\); the outputs are the finished trials'; "
        + re.escape(f"`texforce tune --resume {out}` runs the failed ones again"), stderr.strip().splitlines()[-1])

    resumed = subprocess.run([sys.executable, "-m", "tune.cli", "tune", "--resume", str(out), "--num-cpus", "1"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("trial ")] == ["9/9"]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == 9 and (0.0, 0.0) in {(r["alpha_1"], r["alpha_2"]) for r in rows}


def test_trials_failing_on_a_user_error_raise_it_and_keep_no_state_that_would_block_a_new_start(
        ray_session, tiny_sd_dir, directed_loras, tmp_path):
    """A reward file that loads on the driver but not in the trials (another node's copy): the trials' one-line user
    error, not a RuntimeError; no trial finished, so no Tune state is kept that only `--resume`, which would fail the
    same way, could take: the corrected command starts again with the same --out."""
    from rewards import RewardFileError
    from tune.sweep import can_resume, run_sweep

    head = tmp_path / "head.pth"
    head.write_text("not a checkpoint")
    (tmp_path / "clip").mkdir()
    job = FusionJob(model=tiny_sd_dir, loras=directed_loras[:1], prompts=PROMPTS[:1], reward="aesthetic",
                    settings=SETTINGS, device="cpu",
                    reward_paths=(("aesthetic", str(head)), ("aesthetic_clip", str(tmp_path / "clip"))))
    with pytest.raises(RewardFileError, match=r"^1 of 1 trials failed; first error: reward 'aesthetic': .* is not a "
                                              r"PyTorch checkpoint"):
        run_sweep(job, SweepSettings(num_samples=1, search="random", anchors=False), tmp_path / "ray_results")
    assert not can_resume(tmp_path / "ray_results")


def test_each_trial_gets_its_own_number_out_of_the_total_and_a_resumed_sweep_counts_on(capsys):
    from tune.sweep import _one_line_per_trial

    def trial(status):
        return SimpleNamespace(status=status, TERMINATED="TERMINATED")

    result = {"used_alpha_1": 0.5, "used_alpha_2": 0.25, "objective": 0.75}
    printer = _one_line_per_trial(["alpha_1", "alpha_2"], 16)
    running = [trial("RUNNING"), trial("RUNNING")]
    for reporting in running:  # both report before Tune marks either ended
        printer.on_trial_result(0, running, reporting, result)
    assert capsys.readouterr().out.splitlines() == [
        "trial   1/16  alpha_1=0.500 alpha_2=0.250  objective=0.75000",
        "trial   2/16  alpha_1=0.500 alpha_2=0.250  objective=0.75000"]
    resumed = _one_line_per_trial(["alpha_1", "alpha_2"], 16)
    trials = [trial("TERMINATED"), trial("TERMINATED"), trial("RUNNING")]
    resumed.on_trial_result(0, trials, trials[2], result)
    assert capsys.readouterr().out.startswith("trial   3/16  ")


def test_search_space_helpers():
    assert anchor_points(2, 2.0) == [
        {"alpha_1": 0.0, "alpha_2": 0.0}, {"alpha_1": 2.0, "alpha_2": 0.0},
        {"alpha_1": 0.0, "alpha_2": 2.0}, {"alpha_1": 2.0, "alpha_2": 2.0},
    ]
    # normalized, the base model is no candidate and all zeros would evaluate what all at alpha_max does
    normalized = anchor_points(2, 2.0, normalize=True)
    assert normalized == anchor_points(2, 2.0)[1:]
    assert [config_alphas(point, 2, normalize=True) for point in normalized] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    assert config_alphas({"alpha_1": 1.0, "alpha_2": 3.0}, 2, normalize=True) == [0.25, 0.75]
    assert config_alphas({"alpha_1": 0.0, "alpha_2": 0.0}, 2, normalize=True) == [0.5, 0.5]
    assert config_alphas({"alpha_1": 1.0, "alpha_2": 3.0}, 2, normalize=False) == [1.0, 3.0]
    # a normalized grid: the K-point grid's points that sum to 1, each direction once
    assert simplex_grid(2, 3) == [{"alpha_1": 0.0, "alpha_2": 1.0}, {"alpha_1": 0.5, "alpha_2": 0.5},
                                  {"alpha_1": 1.0, "alpha_2": 0.0}]
    assert len(simplex_grid(3, 5)) == SweepSettings(search="grid", grid=5, normalize=True).num_trials(3) == 15
    assert all(abs(sum(point.values()) - 1.0) < 1e-12 for point in simplex_grid(3, 5))
    assert SweepSettings(search="grid", grid=5).num_trials(3) == 125
    assert resolve_search("grid") == "grid" and resolve_search("auto") in ("optuna", "random")
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_search("bayes")
    assert SweepSettings().anchors
    # a best on the box's top face is flagged: the objective may rise past alpha_max
    assert alphas_at_alpha_max([1.96, 0.5, 2.0], SweepSettings(alpha_max=2.0)) == ["alpha_1", "alpha_3"]
    assert alphas_at_alpha_max([1.8, 0.0], SweepSettings(alpha_max=2.0)) == []
    assert alphas_at_alpha_max([1.0, 1.0], SweepSettings(alpha_max=1.0, normalize=True)) == []
    # a NaN objective (a non-finite score) ranks last, not wherever the sort leaves it
    rows = [{"objective": value} for value in (0.3, float("nan"), 0.9, 0.5)]
    assert [row["objective"] for row in best_first(rows)][:3] == [0.9, 0.5, 0.3]
    # a tie goes to the first trial, in whichever order the trials come (a resumed sweep's best changed)
    tied = [{"trial_id": "t_00001", "objective": 0.75}, {"trial_id": "t_00000", "objective": 0.75}]
    assert [r["trial_id"] for r in best_first(tied)] == [r["trial_id"] for r in best_first(tied[::-1])] == [
        "t_00000", "t_00001"]


def _searched_points(settings: SweepSettings, n: int = 2) -> list[dict[str, float]]:
    """The alphas of each trial the sweep's search algorithm proposes, in order (Tune's own generator, no trial run)."""
    from ray.tune.experiment import Experiment

    from tune.sweep import _search_space

    space, search_alg, num_samples = _search_space(settings, n)
    search_alg.add_configurations([Experiment("points", lambda config: None, config=space, num_samples=num_samples)])
    points = []
    while (trial := search_alg.next_trial()) is not None:
        points.append(trial.config)
    return points


def test_a_random_search_tries_the_anchors_then_draws_seeded_alphas_in_the_box():
    """The real sweep tests run one search seed each: that seeds decide the draws, and that the base model (all
    zeros, which no draw hits) is tried, only show in the points themselves."""
    settings = SweepSettings(search="random", num_samples=8, alpha_max=2.0, seed=0)
    points = _searched_points(settings)
    assert len(points) == 8 and points[:4] == anchor_points(2, 2.0)  # the base model first
    drawn = points[4:]
    assert all(0.0 < a < 2.0 for point in drawn for a in point.values()) and len({p["alpha_1"] for p in drawn}) == 4
    assert _searched_points(settings) == points  # the same seed, the same sweep
    other_seed = _searched_points(SweepSettings(search="random", num_samples=8, alpha_max=2.0, seed=1))
    assert other_seed[:4] == points[:4] and all(a != b for a, b in zip(other_seed[4:], drawn))
    # without anchors every trial is a draw; normalized, the all-zero point is no anchor
    unanchored = _searched_points(SweepSettings(search="random", num_samples=3, alpha_max=2.0, anchors=False))
    assert all(0.0 < a < 2.0 for point in unanchored for a in point.values())
    normalized = _searched_points(SweepSettings(search="random", num_samples=5, alpha_max=1.0, normalize=True))
    assert normalized[:3] == anchor_points(2, 1.0, normalize=True)
    # fewer trials than anchors: the first anchors only
    assert _searched_points(SweepSettings(search="random", num_samples=2, alpha_max=2.0)) == anchor_points(2, 2.0)[:2]
    # a grid: every point of the K x K box once
    grid = _searched_points(SweepSettings(search="grid", grid=3, alpha_max=2.0))
    assert sorted((p["alpha_1"], p["alpha_2"]) for p in grid) == [(a, b) for a in (0.0, 1.0, 2.0) for b in (0.0, 1.0, 2.0)]


def test_a_trials_metrics_are_its_evaluations_summary(job):
    from tune.sweep import trial_metrics

    summary = evaluate_alphas(job, [0.5, 0.25]).summary()
    assert trial_metrics(job, [0.5, 0.25]) == pytest.approx({
        "used_alpha_1": 0.5, "used_alpha_2": 0.25, "objective": summary["objective"]["mean"],
        "objective_sem": summary["objective"]["sem"], "reward/color_alignment": summary["color_alignment"]["mean"]})


class _Tuner:
    """Tune's Tuner without a cluster: records how it was made, returns the given trials' results."""

    made: dict | None = None
    results: tuple = ()

    def __init__(self, trainable, *, param_space, tune_config, run_config):
        _Tuner.made = {"space": param_space, "num_samples": tune_config.num_samples}

    def fit(self):
        return _Tuner.results


def _result(sampled, used, objective=None, error=None):
    metrics = {} if objective is None else {
        "trial_id": "t", "objective": objective, "objective_sem": 0.01, "reward/brightness": objective,
        "worker_pid": 1, "pipeline_loads": 1, "reward_loads": 1,
        **{f"used_alpha_{i + 1}": a for i, a in enumerate(used)}}
    return SimpleNamespace(metrics=metrics, error=error, config={f"alpha_{i + 1}": a for i, a in enumerate(sampled)},
                           path=f"/trials/{sampled}")


def test_run_sweep_gives_tune_its_trials_and_ranks_what_they_found(monkeypatch, tmp_path):
    """`run_sweep` with Tune's Tuner stood in for: the trials it asks for, the rows it makes of the results
    (the alphas used next to those sampled: with --normalize they differ), the trials that failed beside them, and
    the error raised when every trial failed."""
    from ray import tune as ray_tune

    from rl.config import ConfigError
    from tune.sweep import run_sweep

    monkeypatch.setattr(ray_tune, "Tuner", _Tuner)
    monkeypatch.setattr(ray_tune, "with_parameters", lambda trainable, **kwargs: trainable)
    job = FusionJob(model="m", loras=("a", "b"), prompts=PROMPTS, reward="brightness", settings=SETTINGS)
    _Tuner.results = [_result([1.0, 3.0], [0.25, 0.75], 0.4), _result([2.0, 2.0], [0.5, 0.5], 0.6)]
    sweep = run_sweep(job, SweepSettings(search="random", num_samples=2, normalize=True), tmp_path)
    rows = sweep.rows
    assert sweep.errors == [] and not sweep.user_errors
    assert [(r["alpha_1"], r["alpha_2"], r["alpha_1_sampled"], r["alpha_2_sampled"], r["objective"]) for r in rows] == [
        (0.5, 0.5, 2.0, 2.0, 0.6), (0.25, 0.75, 1.0, 3.0, 0.4)]
    run_sweep(job, SweepSettings(search="grid", grid=3, alpha_max=2.0), tmp_path)
    assert _Tuner.made == {"space": {name: {"grid_search": [0.0, 1.0, 2.0]} for name in ("alpha_1", "alpha_2")},
                           "num_samples": 1}  # Tune runs the whole grid num_samples times: once
    run_sweep(job, SweepSettings(search="grid", grid=3, normalize=True), tmp_path)
    assert _Tuner.made["num_samples"] == 3  # the grid's points on the simplex, each once

    # failures beside a finished trial are returned with it, so that its outputs are written; a trial that reported
    # before its worker died finished
    user_error, bug = ConfigError("a user error"), ValueError("a bug")
    _Tuner.results = [_result([1.0, 1.0], [1.0, 1.0], 0.5), _result([0.0, 1.0], [0.0, 1.0], error=user_error),
                      _result([2.0, 0.0], [2.0, 0.0], 0.7, error=RuntimeError("died after its report"))]
    sweep = run_sweep(job, SweepSettings(search="random", num_samples=3), tmp_path)
    assert [r["objective"] for r in sweep.rows] == [0.7, 0.5] and sweep.errors == [user_error] and sweep.user_errors
    assert sweep.reports == ["/trials/[0.0, 1.0]/error.txt"]
    _Tuner.results.append(_result([1.0, 0.0], [1.0, 0.0], error=SimpleNamespace(cause=bug)))  # Ray's wrapper
    sweep = run_sweep(job, SweepSettings(search="random", num_samples=4), tmp_path)
    assert sweep.errors == [user_error, bug] and not sweep.user_errors  # a bug among them
    # when every trial failed there is nothing to write: their error
    _Tuner.results = [_result([0.0, 1.0], [0.0, 1.0], error=user_error)]
    with pytest.raises(ConfigError, match="^1 of 1 trials failed; first error: a user error$"):
        run_sweep(job, SweepSettings(search="random", num_samples=1), tmp_path)
    _Tuner.results.append(_result([1.0, 0.0], [1.0, 0.0], error=bug))
    with pytest.raises(RuntimeError, match="^2 of 2 trials failed; first error: a user error$"):
        run_sweep(job, SweepSettings(search="random", num_samples=2), tmp_path)


def test_an_unfinished_sweep_says_how_far_it_got_and_why_and_exits_by_its_cause():
    from tune.cli import _unfinished_sweep
    from tune.sweep import SweepResult

    rows = [{"objective": 0.5}] * 5
    assert _unfinished_sweep(SweepResult(rows), 16, Path("out")) == (
        ("texforce tune: interrupted after 5 of 16 trials; the outputs are theirs; continue with "
         "`texforce tune --resume out`"), 130)
    died = SweepResult(rows, [RuntimeError("The actor died.\n\tpid: 7")], ["out/t1/error.txt"])
    assert _unfinished_sweep(died, 6, Path("out")) == (
        ("texforce tune: 5 of 6 trials finished, 1 failed (the first: The actor died; Tune's report: out/t1/error.txt);"
         " the outputs are the finished trials'; `texforce tune --resume out` runs the failed ones again"), 1)
    assert _unfinished_sweep(died, 16, Path("out")) == (  # and Ctrl-C
        ("texforce tune: interrupted after 5 of 16 trials, 1 failed (the first: The actor died; Tune's report: "
         "out/t1/error.txt); the outputs are the finished trials'; continue with `texforce tune --resume out`, which "
         "runs the failed ones again"), 130)
    missing = SweepResult(rows, [ConfigError("no such LoRA file: a.safetensors")] * 2, ["r1", "r2"])
    line, code = _unfinished_sweep(missing, 7, Path("out"))  # a file missing on one node: fixed, then resumed
    assert code == 2 and "2 failed (the first: no such LoRA file: a.safetensors; Tune's report: r1)" in line


def test_sweep_outputs_name_the_best_trial_and_how_it_was_searched(directed_loras, tmp_path):
    from safetensors import safe_open

    from tune.sweep import write_sweep_outputs

    job = FusionJob(model="unused", loras=directed_loras, prompts=PROMPTS, reward="color_alignment", settings=SETTINGS)
    trials = [(0.2, 0.5, 0.3), (1.9, 0.1, 0.8), (1.0, 1.0, 0.5), (0.0, 2.0, 0.1)]
    rows = best_first([{"trial_id": str(i), "alpha_1": a1, "alpha_2": a2, "objective": objective,
                        "objective_sem": 0.01 * (i + 1), "reward/color_alignment": objective}
                       for i, (a1, a2, objective) in enumerate(trials)])
    paths = write_sweep_outputs(job, SweepSettings(alpha_max=2.0), rows, tmp_path)
    best = json.loads(paths["best"].read_text())
    assert (best["objective"], best["objective_sem"], best["alphas"]) == (0.8, 0.02, [1.9, 0.1])
    assert best["rewards"] == {"color_alignment": 0.8} and best["num_trials"] == 4
    assert best["at_alpha_max"] == ["alpha_1"]  # 1.9 is within 5% of 2
    assert best["search"] == resolve_search("auto") != "auto"  # the search that ran
    assert best["eval"] == {**vars(SETTINGS), "num_prompts": len(PROMPTS)}
    assert [r["objective"] for r in pq.read_table(paths["results"]).to_pylist()] == [0.8, 0.5, 0.3, 0.1]
    with safe_open(str(paths["best_lora"]), "pt") as f:
        assert json.loads(f.metadata()["texforce_fusion"])["alphas"] == [1.9, 0.1]
    assert paths["plot"].stat().st_size > 5000


@pytest.mark.parametrize("extra, recorded", [
    (["--search", "grid"], {"search": "grid", "grid": 5, "anchors": True, "max_concurrent": 0, "seed": 0}),
    (["--grid", "3", "--no-anchors", "--max-concurrent", "3", "--search-seed", "7"],
     {"search": "grid", "grid": 3, "anchors": False, "max_concurrent": 3, "seed": 7}),
])
def test_a_new_sweep_records_the_options_it_runs_with(tune_args, tmp_path, extra, recorded):
    """sweep.json holds the settings the sweep runs with, and `--resume` continues with."""
    from rl.cli import main

    with pytest.raises(AssertionError, match="Ray started"):  # `tune_args`: its checks passed
        main(tune_args + extra)
    settings = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["settings"]
    assert {key: settings[key] for key in recorded} == recorded


@pytest.mark.parametrize("n, on_a_line", [(1, False), (2, False), (2, True), (3, False)])
def test_objective_plot_for_one_two_and_more_loras(tmp_path, n, on_a_line):
    from tune.plots import plot_objective

    points = np.random.default_rng(0).uniform(0, 1, size=(10, n))
    if on_a_line:  # a normalized sweep's alphas sum to 1: no heat map between them
        points[:, 1] = 1 - points[:, 0]
    path = plot_objective(points, points.sum(1), tmp_path / f"o{n}.png", names=[f"alpha_{i + 1}" for i in range(n)])
    assert path.stat().st_size > 5000


def test_the_objective_plot_stars_the_best_trial_and_draws_one_loras_objective_as_a_line(tmp_path, saved_figures):
    from tune.plots import plot_objective

    points = np.array([[0.5, 1.0], [2.0, 0.2], [1.0, 1.5], [0.0, 0.0]])
    objective = np.array([0.3, 0.9, 0.4, 0.1])  # the best is trial 1, not the last nor the largest alphas
    plot_objective(points, objective, tmp_path / "two.png", names=["alpha_1", "alpha_2"], title="(my sweep)")
    figure = saved_figures[-1]
    assert figure.get_suptitle() == "objective (my sweep)"
    ax = figure.axes[0]
    trials, star = ax.collections[-2:]
    assert np.allclose(trials.get_offsets(), points) and np.allclose(star.get_offsets(), [[2.0, 0.2]])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("alpha_1", "alpha_2")

    # one LoRA: the objective against its alpha, joined in the order of alpha, not of the trials
    plot_objective(points[:, :1], objective, tmp_path / "one.png", names=["alpha_1"])
    ax = saved_figures[-1].axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0.0, 0.5, 1.0, 2.0] and list(line.get_ydata()) == [0.1, 0.3, 0.4, 0.9]
    assert np.allclose(ax.collections[-1].get_offsets(), [[2.0, 0.9]])  # the star
    assert saved_figures[-1].get_suptitle() == "objective"


@pytest.fixture
def tune_args(tiny_sd_dir, directed_loras, tmp_path, monkeypatch):
    """A valid `texforce tune` command line; Ray must not start (nor a model load) while checking it."""
    import ray

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray started before the input was checked")

    monkeypatch.setattr(ray, "init", must_not_start)
    monkeypatch.setattr("tune.sweep.run_sweep", must_not_start)
    monkeypatch.setattr("tune.worker.cached_pipeline", must_not_start)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    return ["tune", "--model", tiny_sd_dir, "--lora", directed_loras[0], "--lora", directed_loras[1],
            "--prompts", str(prompts), "--objective", "color_alignment", "--device", "cpu", "--out", str(tmp_path / "sweep")]


def test_ctrl_c_before_any_trial_finished_says_how_to_go_on(tune_args, tmp_path, monkeypatch, capsys):
    """It said only `texforce tune: interrupted`, and the same command again was refused (`--resume` it)."""
    import ray

    from rl.cli import main

    def interrupted(job, settings, storage, **kwargs):
        (storage / "fusion_sweep").mkdir(parents=True)
        (storage / "fusion_sweep" / "tuner.pkl").write_bytes(b"Tune's state")  # what Tune.can_restore looks for
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr("tune.cli._check_trial_fits", lambda *args, **kwargs: None)
    monkeypatch.setattr("tune.sweep.run_sweep", interrupted)
    assert main(tune_args) == 130
    out = tmp_path / "sweep"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"texforce tune: interrupted before any trial finished; continue with `texforce tune --resume {out}`")


@pytest.mark.parametrize("extra, message", [
    (["--objective", "color_alignment:1,nope:0.2"], "unknown reward 'nope'; valid rewards:"),
    (["--objective", "color_alignment:nan"], "weight 'nan' of 'color_alignment' in spec 'color_alignment:nan' must be"),
    (["--num-samples", "0"], "texforce tune: --num-samples must be >= 1, got 0"),
    (["--alpha-max", "0"], "texforce tune: --alpha-max must be a positive number, got 0.0"),
    (["--alpha-max", "nan"], "texforce tune: --alpha-max must be a positive number, got nan"),
    (["--grid", "1"], "texforce tune: --grid needs at least 2 points per alpha, got 1"),
    (["--steps", "0"], "texforce tune: --steps must be at least 1, got 0"),
    (["--device", "cuda"], "texforce tune: --device cuda needs --gpus-per-trial > 0"),
    (["--lora", "A.safetensors:0.5"], "texforce tune: --lora 'A.safetensors:0.5': tune searches the alphas"),
    (["--grid", "3", "--search", "random"],
     "texforce tune: --grid 3 is a grid search, --search random is not; drop one of them"),
    (["--paths", "color_alignmnt=/x"], "no reward of 'color_alignment' reads a file under the key 'color_alignmnt'"),
    (["--cpus-per-trial", "0"], "texforce tune: --cpus-per-trial must be > 0, got 0.0"),
    (["--gpus-per-trial", "-1"], "texforce tune: --gpus-per-trial must be >= 0, got -1.0"),
    (["--max-concurrent", "-1"], "texforce tune: --max-concurrent must be >= 0 (0: resources decide), got -1"),
    (["--num-cpus", "0"], "texforce tune: --num-cpus must be >= 1, got 0"),
    (["--lora", "A.safetensors:x"], "texforce tune: --lora 'A.safetensors:x': tune searches the alphas"),
    pytest.param(["--search", "optuna"], "texforce tune: --search optuna needs the optuna package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")),
])
def test_tune_checks_its_input_before_ray_starts(tune_args, capsys, extra, message):
    from rl.cli import main

    code = main(tune_args + extra)  # the last value given wins
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_a_trial_larger_than_this_machine_is_refused_before_a_local_ray_starts(tune_args, capsys, monkeypatch):
    """It was refused once Ray had started, after Ray's start-up lines."""
    import ray

    from rl.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whether this process runs the suite's Ray or not
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(tune_args + ["--cpus-per-trial", "3"]) == 2
    assert capsys.readouterr().err == ("texforce tune: a trial asks for 3 CPU (--cpus-per-trial) but a local Ray has 2 "
                                       "(--num-cpus, else this machine's CPUs); lower it\n")
    assert main(tune_args + ["--cpus-per-trial", "3", "--num-cpus", "1"]) == 2
    assert "but a local Ray has 1 (--num-cpus" in capsys.readouterr().err

    def init_ray(address, option, *, num_cpus, include_dashboard):
        raise AssertionError(f"Ray started with {num_cpus} CPUs")

    monkeypatch.setattr("actors.topology.init_ray", init_ray)
    with pytest.raises(AssertionError, match="Ray started with 2 CPUs"):  # a trial as large as Ray fits; --num-cpus
        main(tune_args + ["--cpus-per-trial", "2", "--num-cpus", "2"])


def test_tune_builds_its_reward_before_ray_starts_and_leaves_no_folder(tune_args, tmp_path, capsys):
    """A reward file that exists but does not load fails here, as in `texforce eval`, not in every trial."""
    from rl.cli import main

    head = tmp_path / "head.pth"
    head.write_text("not a checkpoint")
    (tmp_path / "clip").mkdir()
    paths = [f"aesthetic={head}", f"aesthetic_clip={tmp_path / 'clip'}"]
    code = main(tune_args + ["--objective", "aesthetic", "--paths", *paths])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"texforce tune: reward 'aesthetic': {head} is not a PyTorch checkpoint")
    assert not (tmp_path / "sweep").exists()


def test_tune_help_says_how_many_points_a_grid_has_without_grid(capsys, monkeypatch):
    from rl.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps the help to the terminal's width
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert f"grid: {SweepSettings().grid} points per alpha unless --grid K" in capsys.readouterr().out


def test_tune_refuses_a_ray_address_nothing_answers_at_before_ray_starts(tune_args, capsys, monkeypatch):
    import socket

    from rl.cli import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: connections are refused
    for option, extra in (("--ray-address", ["--ray-address", f"127.0.0.1:{port}"]), ("RAY_ADDRESS", [])):
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # read when no --ray-address is given
        assert main(tune_args + extra) == 2
        assert capsys.readouterr().err == (f"texforce tune: {option}=127.0.0.1:{port}: no Ray head answers there "
                                           f"(Connection refused); start one there with `ray start --head "
                                           f"--port={port}`, or correct the address\n")
    # the trials run on the cluster's nodes: this machine's devices are not theirs to check
    assert main(tune_args + ["--device", "cuda", "--gpus-per-trial", "1"]) == 2
    assert f"RAY_ADDRESS=127.0.0.1:{port}: no Ray head answers there" in capsys.readouterr().err


def test_tune_refuses_an_existing_sweep(tune_args, tmp_path, capsys):
    from tune.cli import main

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "best.json").write_text("{}")
    assert main(tune_args) == 2  # python -m tune.cli tune ...: the same handler
    assert capsys.readouterr().err.strip() == (
        f"texforce tune: {tmp_path / 'sweep' / 'best.json'} already exists; remove it or choose another --out")


def test_tune_names_its_missing_options(tune_args, capsys):
    from rl.cli import main

    assert main(["tune", "--model", tune_args[2], "--out", tune_args[-1]]) == 2
    assert capsys.readouterr().err.strip() == (
        "texforce tune: the following arguments are required: --prompts, --lora, --objective")


def test_a_trial_no_node_can_host_is_an_error_on_a_local_ray_and_a_warning_on_a_cluster(
        ray_session, tiny_sd_dir, directed_loras, tmp_path, monkeypatch, capsys):
    from rl.cli import main
    from tune.cli import _check_trial_fits
    from tune.sweep import SweepSettings

    monkeypatch.setattr("tune.sweep.run_sweep", lambda *a, **k: pytest.fail("Tune would wait for the trials forever"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    args = ["tune", "--model", tiny_sd_dir, "--lora", directed_loras[0], "--lora", directed_loras[1], "--prompts",
            str(prompts), "--objective", "color_alignment", "--device", "cpu", "--out", str(tmp_path / "sweep")]
    cpus = ray_session.cluster_resources()["CPU"]
    for extra, asked in ((["--cpus-per-trial", "64"], "64 CPU and 0 GPU"), (["--gpus-per-trial", "1"], "1 CPU and 1 GPU")):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert err == (f"texforce tune: a trial asks for {asked} (--cpus-per-trial, --gpus-per-trial) but no node of "
                       f"the Ray cluster has that much (it has {cpus:g} CPU and 0 GPU in all); lower them, or give a "
                       "local Ray more with --num-cpus\n")
    _check_trial_fits(SweepSettings(cpus_per_trial=64), local=False)  # a cluster may grow: Tune waits for a node
    assert "warning: a trial asks for 64 CPU" in capsys.readouterr().err and ray_session.is_initialized()
    _check_trial_fits(SweepSettings(cpus_per_trial=cpus), local=True)  # one node holds it all: fits


@pytest.mark.parametrize("case", ["no record", "bad record", "another option", "lora changed", "lora gone", "model gone",
                                  "no tune state", "new sweep there", "new sweep after a failed start"])
def test_tune_resume_checks_the_sweep_before_ray_starts(tune_args, tiny_sd_dir, directed_loras, tmp_path, capsys, case):
    """`--resume` continues only the sweep its directory holds, with the options and LoRA files it started with;
    anything else is one line and exit code 2 before Ray starts (`tune_args` fails the test if it does)."""
    import shutil

    from rl.cli import main
    from tune.sweep import write_sweep_record

    out = tmp_path / "sweep"
    lora = tmp_path / "a.safetensors"
    shutil.copy(directed_loras[0], lora)
    if case != "no record":
        model = str(tmp_path / "moved") if case == "model gone" else tiny_sd_dir
        write_sweep_record(FusionJob(model=model, loras=(str(lora), directed_loras[1]), prompts=PROMPTS,
                                     reward="color_alignment", settings=SETTINGS, device="cpu"),
                           SweepSettings(search="grid", grid=3), out)
    if case == "bad record":
        (out / "sweep.json").write_text("{}")
    if case == "new sweep there":  # Tune's state: what Tuner.can_restore looks for
        (out / "ray_results" / "fusion_sweep").mkdir(parents=True)
        (out / "ray_results" / "fusion_sweep" / "tuner.pkl").write_bytes(b"")
    if case == "new sweep after a failed start":  # sweep.json written, Ray never started: a new start may reuse --out
        with pytest.raises(AssertionError, match="Ray started"):  # `tune_args`: its checks passed
            main(tune_args)
        assert json.loads((out / "sweep.json").read_text())["job"]["loras"] == list(directed_loras)
        return
    if case == "lora changed":
        lora.write_bytes(lora.read_bytes() + b" ")
    if case == "lora gone":
        lora.unlink()
    argv = {"another option": ["tune", "--resume", str(out), "--grid", "5"],
            "no tune state": ["tune", "--resume", str(out), "--num-cpus", "1"],  # an option --resume takes
            "new sweep there": tune_args}.get(case, ["tune", "--resume", str(out)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert {
        "no record": f"texforce tune: --resume {out}: no sweep to resume there (no sweep.json)",
        "bad record": f"texforce tune: --resume {out}: {out / 'sweep.json'} is not a sweep record",
        "another option": f"texforce tune: --resume continues the sweep with the options it started with "
                          f"({out / 'sweep.json'}); drop --grid: only --ray-address and --num-cpus go with --resume",
        "lora changed": f"texforce tune: --resume {out}: the sweep's LoRA {lora} has changed since the sweep started",
        "lora gone": f"texforce tune: --resume {out}: the sweep's LoRA {lora} is gone",
        "model gone": f"texforce tune: model directory not found: {tmp_path / 'moved'}",
        "no tune state": f"texforce tune: --resume {out}: Tune kept no state of this sweep ({out / 'ray_results'}): it "
                         "stopped before its first trial; start it again with the same --out",
        "new sweep there": f"texforce tune: {out} holds a sweep already; continue it with `texforce tune --resume {out}`",
    }[case] in err


def test_importing_tune_does_not_load_ray():
    import subprocess
    import sys

    code = "import sys, tune.cli, tune.sweep, tune.worker, tune.fusion, tune.evaluate, tune.plots; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
