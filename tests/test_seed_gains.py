"""bench/seed_gains.py: held-out gains of finished runs per seed, grouped by configuration."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seed_gains  # noqa: E402

from rl.config import load_config  # noqa: E402
from rl.run_dir import RunDirectory  # noqa: E402
from tune.evaluate import seeds_and_prompts_sem  # noqa: E402

BEFORE = [0.0, 0.5, 1.0, 0.5, 0.0, 1.0]  # 3 held-out prompts x 2 images each, prompt-major


def make_run(root: Path, name: str, seed: int, after: list[float], before: list[float] = BEFORE) -> Path:
    """A run directory as the driver leaves it: its config and evaluations before and after training."""
    config = load_config(ROOT / "configs" / "tiny.yaml",
                         [f"seed={seed}", f"output_dir={root}", f"run_name={name}", "evaluation.num_seeds=2"])
    run = RunDirectory.create(config)
    for epoch, rewards in ((-1, before), (9, [0.0] * len(before)), (19, after)):
        run.append_evaluation({"epoch": epoch, "rewards": rewards, "reward_mean": float(np.mean(rewards))})
    return run.path


def test_each_runs_gain_is_paired_over_its_last_evaluation_and_seeds_are_summarised_per_group(tmp_path, capsys):
    a0 = make_run(tmp_path, "a0", 0, [0.5, 1.0, 1.0, 1.0, 0.5, 1.0])  # prompt gains +0.5 +0.25 +0.25
    a1 = make_run(tmp_path, "a1", 1, [0.0, 0.5, 1.0, 0.5, 0.0, 0.5])  # 0, 0, -0.25
    b3 = make_run(tmp_path, "b3", 3, [0.5, 0.5, 1.0, 1.0, 0.5, 1.0])  # +0.25 +0.25 +0.25
    out = tmp_path / "out"
    assert seed_gains.main(["--group", "a", str(a0), str(a1), "--group", "b", str(b3), "--out", str(out)]) == 0

    result = json.loads((out / "seed_gains.json").read_text())
    runs = {(r["group"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {("a", 0), ("a", 1), ("b", 3)}
    assert runs[("a", 0)]["epoch"] == 19  # the last evaluation, not the one in between
    differences = np.array([0.5, 0.5, 0.0, 0.5, 0.5, 0.0])
    assert runs[("a", 0)]["gain"] == pytest.approx(differences.mean())
    assert runs[("a", 0)]["sem"] == pytest.approx(differences.std(ddof=1) / np.sqrt(6))
    assert runs[("a", 0)]["per_prompt"] == pytest.approx([0.5, 0.25, 0.25])
    # the 3 prompts as the draws: the spread of the per-prompt gains, std / sqrt(3)
    assert runs[("a", 0)]["sem_over_prompts"] == pytest.approx(np.std([0.5, 0.25, 0.25], ddof=1) / np.sqrt(3))
    assert runs[("a", 1)]["per_prompt"] == pytest.approx([0.0, 0.0, -0.25])

    groups = {g["group"]: g for g in result["groups"]}
    gains_a = [runs[("a", 0)]["gain"], runs[("a", 1)]["gain"]]
    assert groups["a"]["mean"] == pytest.approx(np.mean(gains_a))
    assert groups["a"]["std"] == pytest.approx(np.std(gains_a, ddof=1))
    assert groups["a"]["positive"] == 1 and groups["a"]["above"] == 1  # seed 0: +0.33 is 3.2 standard errors
    assert groups["a"]["correlation"] == pytest.approx(0.5)
    assert groups["b"]["positive"] == 1 and groups["b"]["above"] == 0  # +0.25 is 2.2 standard errors
    assert groups["b"]["seeds"] == 1 and groups["b"]["std"] == 0.0 and np.isnan(groups["b"]["correlation"])
    # the seeds' mean gain per prompt, its standard error counting both seeds and prompts as draws
    assert groups["a"]["mean_per_prompt"] == pytest.approx(np.mean([0.5, 0.25, 0.25, 0.0, 0.0, -0.25]))
    assert groups["a"]["sem_over_seeds_and_prompts"] == pytest.approx(
        seeds_and_prompts_sem(np.array([[0.5, 0.25, 0.25], [0.0, 0.0, -0.25]])))
    assert (out / "seed_gains.png").stat().st_size > 0
    assert (out / "seed_gains.md").read_text().strip() in capsys.readouterr().out


def test_runs_scored_on_other_images_are_one_line_and_exit_2(tmp_path, capsys):
    a0 = make_run(tmp_path, "a0", 0, [0.5] * 6)
    other = make_run(tmp_path, "other", 1, [0.5] * 6, before=[1.0] * 6)
    out = tmp_path / "out"
    assert seed_gains.main(["--group", "a", str(a0), "--group", "b", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err and "other images" in err
    assert not out.exists()


def test_a_non_finite_score_is_left_out_and_does_not_part_identical_runs(tmp_path):
    before = [float("nan")] + BEFORE[1:]  # the base model's first image had no score
    a0 = make_run(tmp_path, "a0", 0, [0.5, 1.0, 1.0, 1.0, 0.5, 1.0], before=before)
    a1 = make_run(tmp_path, "a1", 1, [0.5, 1.0, 1.0, 1.0, 0.5, 1.0], before=before)
    out = tmp_path / "out"
    assert seed_gains.main(["--group", "a", str(a0), str(a1), "--out", str(out)]) == 0
    runs = json.loads((out / "seed_gains.json").read_text())["runs"]
    assert runs[0]["per_prompt"] == pytest.approx([0.5, 0.25, 0.25])  # prompt 0 over its one finite pair
    assert runs[0]["gain"] == pytest.approx(np.mean([0.5, 0.0, 0.5, 0.5, 0.0]))


def test_a_folder_without_evaluations_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert seed_gains.main(["--group", "a", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no evaluation.parquet" in capsys.readouterr().err


def test_a_group_at_an_epoch_reads_the_evaluation_after_that_epoch(tmp_path):
    a0 = make_run(tmp_path, "a0", 0, [1.0] * 6)  # evaluated after epochs 9 (all zeros) and 19
    out = tmp_path / "out"
    assert seed_gains.main(["--group", "short@9", str(a0), "--group", "long", str(a0), "--out", str(out)]) == 0
    runs = {r["group"]: r for r in json.loads((out / "seed_gains.json").read_text())["runs"]}
    assert runs["short@9"]["epoch"] == 9 and runs["short@9"]["gain"] == pytest.approx(-np.mean(BEFORE))
    assert runs["long"]["epoch"] == 19 and runs["long"]["gain"] == pytest.approx(1.0 - np.mean(BEFORE))


def test_an_epoch_a_run_was_not_evaluated_after_is_named_with_the_ones_it_has(tmp_path, capsys):
    a0 = make_run(tmp_path, "a0", 0, [1.0] * 6)
    assert seed_gains.main(["--group", "a@29", str(a0), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no evaluation after epoch 29 (it has 9, 19)" in err
    with pytest.raises(SystemExit) as exit_info:
        seed_gains.main(["--group", "a@last", str(a0), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "e.g. a@19" in capsys.readouterr().err


def test_each_part_of_a_composite_reward_is_summarised_with_how_it_follows_the_gain(tmp_path):
    # three seeds of an object_alignment run: colour moves with the gain, shape rises on every seed
    runs = []
    for seed, (after, color, shape) in enumerate((([1.0] * 6, 0.9, 0.4), ([0.5] * 6, 0.7, 0.35), ([0.0] * 6, 0.5, 0.5))):
        config = load_config(ROOT / "configs" / "tiny.yaml",
                             [f"seed={seed}", f"output_dir={tmp_path}", f"run_name=s{seed}", "evaluation.num_seeds=2"])
        run = RunDirectory.create(config)
        for epoch, rewards, parts in ((-1, BEFORE, (0.6, 0.3)), (19, after, (color, shape))):
            run.append_evaluation({"epoch": epoch, "rewards": rewards, "reward_mean": float(np.mean(rewards)),
                                   "reward_spec": "object_alignment", "reward_object_alignment_mean": 0.5,
                                   "reward_object_alignment_color_mean": parts[0],
                                   "reward_object_alignment_shape_mean": parts[1]})
        runs.append(str(run.path))
    out = tmp_path / "out"
    assert seed_gains.main(["--group", "g", *runs, "--out", str(out)]) == 0

    result = json.loads((out / "seed_gains.json").read_text())
    assert [r["parts"] for r in result["runs"]] == [pytest.approx({"color": c, "shape": s})
                                                    for c, s in ((0.3, 0.1), (0.1, 0.05), (-0.1, 0.2))]
    parts = result["groups"][0]["parts"]
    assert set(parts) == {"color", "shape"}  # not the overall mean
    gains = [r["gain"] for r in result["runs"]]
    assert parts["color"]["mean"] == pytest.approx(0.1) and parts["color"]["rising"] == 2
    assert parts["color"]["correlation"] == pytest.approx(np.corrcoef([0.3, 0.1, -0.1], gains)[0, 1])
    assert parts["color"]["correlation"] > 0.99 and parts["shape"]["rising"] == 3
    assert parts["shape"]["correlation"] < 0
    assert "| g | shape | +0.1167 +- 0.0764 | 3 of 3 |" in (out / "seed_gains.md").read_text()


def test_a_reward_without_parts_adds_no_part_table(tmp_path):
    a0 = make_run(tmp_path, "a0", 0, [1.0] * 6)
    out = tmp_path / "out"
    assert seed_gains.main(["--group", "a", str(a0), "--out", str(out)]) == 0
    assert json.loads((out / "seed_gains.json").read_text())["groups"][0]["parts"] == {}
    assert "reward part" not in (out / "seed_gains.md").read_text()
