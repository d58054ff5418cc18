"""bench/algorithm_curves.py: every algorithm trained for one wall-clock budget, curves in one figure."""
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import algorithm_curves  # noqa: E402

from rl.algorithms import algorithm_names  # noqa: E402
from rl.config import load_config  # noqa: E402


def test_every_registered_algorithm_has_its_overrides():
    assert set(algorithm_curves.METHOD_OVERRIDES) == set(algorithm_names())


def test_smooth_is_a_trailing_mean():
    assert algorithm_curves.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2) == pytest.approx([1.0, 2.0, 4.0, 6.0])


def test_a_tiny_budget_stops_each_run_after_one_epoch_and_reruns_reuse_it(tiny_sd_dir, tmp_path, one_torch_thread):
    out = tmp_path / "curves"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\n")
    overrides = [f"model.pretrained={tiny_sd_dir}", "sample.num_steps=4", "sample.batch_size=4",
                 "sample.num_batches_per_epoch=1", "advantage.group_size=4", "train.batch_size=4", "lora.rank=4",
                 "lora.alpha=4", "train.min_sigma=0", "prompts.file=null", f"evaluation.prompts_file={held_out}",
                 "train.learning_rate=2e-3"]
    argv = [*overrides, "--out", str(out), "--budget-s", "0.01", "--algorithms", "ppo", "refl", "--eval-seeds", "2",
            "--reward", "object_alignment_soft", "--seeds", "0", "1"]
    runs = [(name, seed) for seed in (0, 1) for name in ("ppo", "refl")]
    assert algorithm_curves.main(argv) == 0
    for name, seed in runs:  # --reward is what every run trains on, --seeds sets each run's seed
        config = load_config(out / f"seed{seed}" / name / "config.yaml")
        assert config.reward.spec == "object_alignment_soft" and config.seed == seed
        # the user's overrides win over an algorithm's own (refl's learning rate is 1e-3); the in-run evaluation stays off
        assert config.train.learning_rate == 2e-3 and config.evaluation.prompts_file is None

    rows = pq.read_table(out / "curves.parquet").to_pylist()
    assert [(r["algorithm"], r["seed"]) for r in rows] == runs
    for row in rows:
        assert np.isfinite(row["reward_mean"]) and row["seconds"] > 0
        metrics = pq.read_table(out / f"seed{row['seed']}" / row["algorithm"] / "metrics.parquet").to_pylist()
        assert len(metrics) == 1
        assert row["epoch"] == metrics[0]["epoch"] == 0
        assert row["seconds"] == metrics[0]["wall_seconds"]
        assert row["reward_mean"] == metrics[0]["reward_mean"]
        assert row["num_samples"] == metrics[0]["num_samples"] == 4
    # two seeds train two different LoRAs
    seed0, seed1 = (load_file(out / f"seed{seed}" / "refl" / "final_lora" / "pytorch_lora_weights.safetensors")
                    for seed in (0, 1))
    assert any(not torch.equal(seed0[key], seed1[key]) for key in seed0)
    assert (out / "curves.png").stat().st_size > 0
    table = (out / "curves.md").read_text()
    assert "| ppo | 0 | 1 | 4 |" in table and "| refl | 1 | 1 | 4 |" in table
    assert "| ppo | 2 |" in table and "| refl | 2 |" in table  # the summary over seeds

    # the budget ends a run like its last epoch: the final LoRA is written and scored (with --reward) against
    # the base on the same held-out images (2 prompts x 2 seeds); a gain is the paired difference of those scores
    scored = pq.read_table(out / "held_out.parquet").to_pylist()
    assert [(r["method"], r["seed"]) for r in scored] == [("base", -1), *runs]
    base = pq.read_table(out / "scores" / "base.parquet")["reward"].to_numpy()
    assert scored[0]["gain"] == 0 and scored[0]["reward"] == pytest.approx(float(base.mean()))
    for row in scored[1:]:
        parts = pq.read_table(out / "scores" / f"seed{row['seed']}_{row['method']}.parquet")
        final = parts["reward"].to_numpy()
        assert row["num_images"] == len(final) == len(base) == 4
        assert row["gain"] == pytest.approx(float((final - base).mean()))
        assert row["reward"] == pytest.approx(float(final.mean()))
        # an object reward also reports its exact reading: the share of images with the colour / shape right
        assert row["color"] == pytest.approx(float(parts["object_alignment_soft_color"].to_numpy().mean()))
        assert row["shape"] == pytest.approx(float(parts["object_alignment_soft_shape"].to_numpy().mean()))

    # a second call reads the finished runs instead of training again
    metrics_files = [out / f"seed{seed}" / name / "metrics.parquet" for name, seed in runs]
    written = [path.stat().st_mtime_ns for path in metrics_files]
    assert algorithm_curves.main(argv) == 0
    assert [path.stat().st_mtime_ns for path in metrics_files] == written
    assert pq.read_table(out / "curves.parquet").to_pylist() == rows
    assert pq.read_table(out / "held_out.parquet").to_pylist() == scored
    # a finished run is never reused for another reward
    with pytest.raises(SystemExit, match="was trained on object_alignment_soft, not color_alignment; use another --out"):
        algorithm_curves.main([a for a in argv if a not in ("--reward", "object_alignment_soft")])
