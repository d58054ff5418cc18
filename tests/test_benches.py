"""The performance benchmarks run end to end on the tiny model (their figures come from the
README's commands on the real sizes; here only that they measure what they say)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import learner_overhead  # noqa: E402
import overlap  # noqa: E402
import sampler_overhead  # noqa: E402


def test_sampler_bench_times_both_calls_on_the_same_work(tiny_sd_dir, tmp_path, one_torch_thread):
    out = tmp_path / "sampler.json"
    sampler_overhead.main([tiny_sd_dir, "--batch", "2", "--steps", "3", "--repeats", "2", "--threads", "1",
                           "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["times"]) == {"sample_trajectories", "pipe(...)"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["times"].values())
    assert result["ratio"] == pytest.approx(result["medians"]["sample_trajectories"] / result["medians"]["pipe(...)"])


def test_learner_bench_compares_the_update_with_its_ideal_and_with_reencoding(tiny_sd_dir, tmp_path, one_torch_thread):
    out = tmp_path / "learner.json"
    learner_overhead.main([tiny_sd_dir, "--batch", "2", "--repeats", "1", "--threads", "1", "--out", str(out),
                           "sample.num_steps=4", "train.min_sigma=0"])
    result = json.loads(out.read_text())
    assert set(result["medians"]) == {"learner", "ideal", "re-encode every step"}
    assert result["learner_over_ideal"] == pytest.approx(result["medians"]["learner"] / result["medians"]["ideal"])


def test_overlap_summary_times_epochs_after_warmup_per_loop():
    runs = [{"staleness": 0, "samples_per_epoch": 100, "epoch_seconds": [9.0, 10.0, 10.0],
             "update_seconds": [6.0, 6.0, 6.0, 6.0]},
            {"staleness": 1, "samples_per_epoch": 100, "epoch_seconds": [7.0, 5.0, 5.0],
             "update_seconds": [5.0, 5.0, 5.0, 5.0]}]
    table = overlap.summarize(runs, warmup=2)  # epoch 0 has no period; epoch 1's is left out too
    assert table[0]["median_epoch_seconds"] == 10.0 and table[0]["samples_per_second"] == 10.0
    assert table[1]["median_epoch_seconds"] == 5.0 and table[1]["epochs_timed"] == 2
