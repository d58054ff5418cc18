"""bench/evidence.py: every method trained, fused and scored on one held-out set, on the tiny model."""
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import evidence  # noqa: E402

import rewards  # noqa: E402
from rl.models import load_pipeline  # noqa: E402
from tune.evaluate import EvalSettings, evaluate  # noqa: E402


def test_evidence_trains_fuses_and_scores_every_method(tiny_sd_dir, tmp_path, capsys, one_torch_thread):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\n")
    out = tmp_path / "evidence"
    overrides = [f"model.pretrained={tiny_sd_dir}", "sample.num_steps=4", "sample.batch_size=4",
                 "sample.num_batches_per_epoch=1", "advantage.group_size=4", "train.batch_size=4", "num_epochs=1",
                 "lora.rank=4", "lora.alpha=4", f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=1",
                 "train.min_sigma=0", "prompts.file=null"]
    methods = ["texforce", "ddpo", "texforce + ddpo", "refl", "refl + texforce"]
    assert evidence.main([*overrides, "--out", str(out), "--seeds", "0", "--eval-seeds", "2", "--methods",
                          *methods]) == 0
    rows = pq.read_table(out / "evidence.parquet").to_pylist()
    assert [r["method"] for r in rows] == ["base", *methods]
    assert all(np.isfinite(r["reward"]) and np.isfinite(r["gain"]) for r in rows)
    assert (out / "evidence.png").stat().st_size > 0
    table = (out / "evidence.md").read_text()
    assert all(f"| {m} | 1 |" in table for m in ["base", *methods])

    # the numbers are those of the base pipeline with the runs' LoRAs loaded by diffusers
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    reward = rewards.build_reward("object_alignment")
    settings = EvalSettings(num_seeds=2, base_seed=2**31, num_steps=4, guidance_scale=5.0, eta=1.0)
    prompts = ["a purple hat", "a white cup"]
    base = evaluate(pipe, reward, prompts, settings).objective
    assert rows[0]["reward"] == pytest.approx(base.mean(), abs=1e-6)
    pipe.load_lora_weights(str(out / "refl_seed0" / "final_lora"), adapter_name="refl")
    pipe.load_lora_weights(str(out / "texforce_seed0" / "final_lora"), adapter_name="texforce")
    # (each component holds one of them, so both are active)
    fused = evaluate(pipe, reward, prompts, settings).objective
    row = rows[methods.index("refl + texforce") + 1]
    assert row["reward"] == pytest.approx(fused.mean(), abs=1e-5)
    assert row["gain"] == pytest.approx((fused - base).mean(), abs=1e-5)

    # a second call reuses the trained runs instead of training again
    lora = out / "texforce_seed0" / "final_lora" / "pytorch_lora_weights.safetensors"
    written = lora.stat().st_mtime_ns
    assert evidence.main([*overrides, "--out", str(out), "--seeds", "0", "--eval-seeds", "2", "--methods",
                          "texforce"]) == 0
    assert lora.stat().st_mtime_ns == written
