"""bench/evidence.py (every method trained, fused and scored on one held-out set) and
bench/fusion_search.py (grid and `texforce tune`, confirmed on other images), on the tiny model."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import evidence  # noqa: E402

import rewards  # noqa: E402
from rl.models import load_pipeline  # noqa: E402
from tune.evaluate import EvalSettings, evaluate, seeds_and_prompts_sem  # noqa: E402


def test_gains_count_the_prompts_and_the_seeds():
    """A row's standard error over the held-out prompts, and the seeds' mean gain per image with its own, on
    scores whose answer is known: 3 prompts x 2 images each (prompt-major, as `eval_set` orders them)."""
    prompts = ["a red ball"] * 2 + ["a blue cup"] * 2 + ["a green hat"] * 2
    base = {"reward": np.array([0.5, 0.5, 0.0, 0.5, 1.0, 0.5])}
    seed0 = {"reward": base["reward"] + np.array([0.5, 0.1, 0.0, 0.0, -0.1, -0.3])}  # per prompt +0.3, 0, -0.2
    seed1 = {"reward": base["reward"] + np.array([0.1, 0.1, 0.5, 0.5, 0.0, 0.0])}  # per prompt +0.1, +0.5, 0
    row = evidence.rows_for("texforce", 0, seed0, base, prompts)
    assert row["gain"] == pytest.approx(0.1 / 3)
    # equal images per prompt: the spread of the prompts' mean gains over sqrt(3), not the images' over sqrt(6)
    assert row["gain_sem_over_prompts"] == pytest.approx(np.std([0.3, 0.0, -0.2], ddof=1) / np.sqrt(3))
    assert row["gain_sem"] == pytest.approx(np.std(seed0["reward"] - base["reward"], ddof=1) / np.sqrt(6))
    fused = evidence.rows_for("color + shape", 0, seed1, base, prompts, [seed0, base])
    assert fused["over_first_part"] == pytest.approx(0.5 / 3)
    assert fused["over_first_part_sem_over_prompts"] == pytest.approx(np.std([-0.2, 0.5, 0.2], ddof=1) / np.sqrt(3))
    assert fused["over_second_part_sem_over_prompts"] == pytest.approx(np.std([0.1, 0.5, 0.0], ddof=1) / np.sqrt(3))
    pooled = evidence.seeds_mean_gain([seed0, seed1], [base, base], prompts)  # per prompt +0.2, +0.25, -0.1
    assert pooled["mean"] == pytest.approx(0.35 / 3)
    # seeds x prompts [[0.3, 0, -0.2], [0.1, 0.5, 0]]: the crossed two-way standard error
    assert pooled["sem"] == pytest.approx(seeds_and_prompts_sem(np.array([[0.3, 0.0, -0.2], [0.1, 0.5, 0.0]])))
    assert (pooled["prompts_rising"], pooled["prompts"], pooled["seeds"]) == (2, 3, 2)
    # a fused model against its part, seed by seed: (seed1 - seed0) on seed 0, (seed1 - base) on seed 1
    over = evidence.seeds_mean_gain([seed1, seed1], [seed0, base], prompts)  # per prompt -0.05, +0.5, +0.1
    assert over["sem"] == pytest.approx(seeds_and_prompts_sem(np.array([[-0.2, 0.5, 0.2], [0.1, 0.5, 0.0]])))
    rows = [evidence.rows_for("base", -1, base, base, prompts), row, evidence.rows_for("texforce", 1, seed1, base, prompts)]
    line = evidence.table(rows, ["base", "texforce"], {"texforce": {"gain": pooled}}).splitlines()[-1]
    assert line.startswith("| texforce | 2 |")
    assert f"[{row['gain_sem_over_prompts']:.3f}]" in line
    assert f"| +0.117 +- {pooled['sem']:.3f} ({0.35 / 3 / pooled['sem']:+.1f} SE; 2 of 3 prompts rise) |" in line
    fused_rows = [fused, {**fused, "seed": 1}]
    line = evidence.table(fused_rows, ["color + shape"], {"color + shape": {"over_first_part": over}}).splitlines()[-1]
    assert f"seeds' mean {over['mean']:+.3f} +- {over['sem']:.3f}" in line


def test_evidence_trains_fuses_and_scores_every_method(tiny_sd_dir, tmp_path, capsys, one_torch_thread):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\n")
    out = tmp_path / "evidence"
    overrides = [f"model.pretrained={tiny_sd_dir}", "sample.num_steps=4", "sample.batch_size=4",
                 "sample.num_batches_per_epoch=1", "advantage.group_size=4", "train.batch_size=4", "num_epochs=1",
                 "lora.rank=4", "lora.alpha=4", f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=1",
                 "train.min_sigma=0", "prompts.file=null"]
    methods = ["texforce", "ddpo", "texforce + ddpo", "refl", "refl + texforce", "color + shape"]
    assert evidence.main([*overrides, "--out", str(out), "--seeds", "0", "--eval-seeds", "2", "--methods",
                          *methods]) == 0
    rows = pq.read_table(out / "evidence.parquet").to_pylist()
    assert [r["method"] for r in rows] == ["base", *methods]  # the fused model's parts scored, not listed
    assert (out / "texforce_color_seed0" / "final_lora").is_dir() and (out / "texforce_shape_seed0").is_dir()
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
    assert np.isfinite(row["gain_sem_over_prompts"])  # its value: test_gains_count_the_prompts_and_the_seeds
    # a fused row's difference to each part alone is paired over the same images
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out / "refl_seed0" / "final_lora"))
    refl = evaluate(pipe, reward, prompts, settings).objective
    assert row["over_first_part"] == pytest.approx((fused - refl).mean(), abs=1e-5)
    assert row["over_first_part_sem"] == pytest.approx((fused - refl).std(ddof=1) / 2, abs=1e-5)
    assert row["over_second_part"] == pytest.approx(row["gain"] - rows[1]["gain"], abs=1e-5)
    assert np.isnan(rows[1]["over_first_part"])  # texforce is not fused
    pipe.unload_lora_weights()

    # a second call reuses the trained runs instead of training again, and the scores it kept
    lora = out / "texforce_seed0" / "final_lora" / "pytorch_lora_weights.safetensors"
    written = lora.stat().st_mtime_ns
    kept = out / "scores" / "object_alignment" / "texforce_seed0.parquet"
    scored = kept.stat().st_mtime_ns
    assert evidence.main([*overrides, "--out", str(out), "--seeds", "0", "--eval-seeds", "2", "--methods",
                          "texforce"]) == 0
    assert lora.stat().st_mtime_ns == written and kept.stat().st_mtime_ns == scored

    # two processes at a time: another evaluation set is scored again (the kept scores do not
    # match it), in child processes, to the same numbers as in this one
    assert evidence.main([*overrides, "--out", str(out), "--seeds", "0", "--eval-seeds", "3", "--jobs", "2",
                          "--methods", "texforce"]) == 0
    assert lora.stat().st_mtime_ns == written and kept.stat().st_mtime_ns != scored
    rows = pq.read_table(out / "evidence.parquet").to_pylist()
    base3 = evaluate(pipe, reward, prompts, EvalSettings(**{**vars(settings), "num_seeds": 3})).objective
    pipe.load_lora_weights(str(out / "texforce_seed0" / "final_lora"))
    texforce3 = evaluate(pipe, reward, prompts, EvalSettings(**{**vars(settings), "num_seeds": 3})).objective
    assert rows[0]["reward"] == pytest.approx(base3.mean(), abs=1e-6)
    assert rows[1]["gain"] == pytest.approx((texforce3 - base3).mean(), abs=1e-5)


def _wait_for(path: str) -> bool:
    """A task that finishes once another task has run (False if none did within 5 minutes)."""
    deadline = time.monotonic() + 300
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _touch(path: str) -> str:
    Path(path).touch()
    return path


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_task_starts_as_soon_as_the_tasks_it_needs_are_done(tmp_path, jobs):
    trained, scored = str(tmp_path / "trained"), str(tmp_path / "scored")
    if jobs == 1:  # in order of index among the tasks that may start
        tasks = [(_touch, (scored,), {}), (os.path.exists, (scored,), {}), (str.upper, ("b",), {})]
        assert list(evidence.run_tasks(tasks, 1, [None] * 3, after=[(2,), (), ()])) == [
            (1, False), (2, "B"), (0, scored)]
    else:  # a long run (0) and a short one (2): 2's scorings (1, then 3) run beside 0, which waits for 3
        tasks = [(_wait_for, (scored,), {}), (os.path.exists, (trained,), {}), (_touch, (trained,), {}),
                 (_touch, (scored,), {})]
        assert list(evidence.run_tasks(tasks, 2, [None] * 4, after=[(), (2,), (), (1,)])) == [
            (2, trained), (1, True), (3, scored), (0, True)]
    with pytest.raises(ValueError, match="wait on each other"):
        list(evidence.run_tasks([(str.upper, ("a",), {})] * 2, jobs, [None] * 2, after=[(1,), (0,)]))


def test_config_overrides_may_follow_the_methods(capsys):
    method = next(iter(evidence.TRAINED))
    args = evidence.parse_args(["--methods", method, "evaluation.seed_base=7", "--jobs", "2"])
    assert args.methods == [method] and args.overrides == ["evaluation.seed_base=7"] and args.jobs == 2
    for argv, message in ((["--methods", method + "x"], f"unknown {method}x"), (["--methods", "a=b"], "no method given")):
        with pytest.raises(SystemExit) as exit_info:
            evidence.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_every_method_is_a_valid_config_of_the_demo():
    # a typo in a method's overrides would otherwise surface only when its turn to train comes
    for method, overrides in evidence.TRAINED.items():
        config = evidence.load_config(ROOT / "configs" / "tiny.yaml", overrides)
        assert config.reward.spec.startswith("object_"), method
    # the papers' table trains at the demo's KL penalty; the fusion study's methods at the one their tables
    # were measured with (0.1), unless the command line sets it; a method's own override wins over both
    demo_now = evidence.load_config(ROOT / "configs" / "tiny.yaml", [])
    trained = evidence.method_config("texforce", 3, base_config=ROOT / "configs" / "tiny.yaml", out=Path("runs/x"),
                                     overrides=[])
    fusion_part = evidence.method_config("texforce_shape", 3, base_config=ROOT / "configs" / "tiny.yaml",
                                         out=Path("runs/x"), overrides=[])
    assert (trained.train.kl_coef, demo_now.train.kl_coef, fusion_part.train.kl_coef) == (0.05, 0.05, 0.1)
    assert {method for method in evidence.TRAINED if method not in evidence.MEASURED_AT} == {"texforce", "ddpo", "refl"}
    assert (trained.seed, trained.run_name, trained.resources.mode, trained.evaluation.prompts_file) == (
        3, "texforce_seed3", "inline", None)
    asked = evidence.method_config("texforce_color", 0, base_config=ROOT / "configs" / "tiny.yaml",
                                   out=Path("runs/x"), overrides=["train.kl_coef=0.05", "lora.policy=both"])
    assert (asked.train.kl_coef, asked.lora.policy) == (0.05, "both")
    ddpo = evidence.method_config("ddpo", 0, base_config=ROOT / "configs" / "tiny.yaml", out=Path("runs/x"),
                                  overrides=["lora.policy=both"])
    assert ddpo.lora.policy == "unet"
    assert {part for parts in evidence.FUSED.values() for part in parts} <= set(evidence.TRAINED)
    textcraftor = evidence.load_config(ROOT / "configs" / "tiny.yaml", evidence.TRAINED["textcraftor_shape"])
    assert (textcraftor.train.algorithm, textcraftor.lora.policy, textcraftor.reward.spec) == (
        "textcraftor", "text_encoder", "object_shape_soft")
    held = evidence.load_config(ROOT / "configs" / "tiny.yaml", evidence.TRAINED["textcraftor_kl_shape"])
    loose = evidence.load_config(ROOT / "configs" / "tiny.yaml", evidence.TRAINED["textcraftor_kl10_shape"])
    assert (held.gradient.kl_coef, loose.gradient.kl_coef, textcraftor.gradient.kl_coef) == (50, 10, 0)
    loose_color = evidence.load_config(ROOT / "configs" / "tiny.yaml", evidence.TRAINED["textcraftor_kl10_color"])
    assert (loose_color.gradient.kl_coef, loose_color.reward.spec) == (10, "object_color_soft")
    # the wide PPO shape run trains every step of the toy model's schedule but the one onto t=1 (step 8)
    from diffusers import DDIMScheduler

    from rl.ddim import DDIMSchedule
    from rl.learner import trainable_steps

    wide = evidence.load_config(ROOT / "configs" / "tiny.yaml", evidence.TRAINED["texforce_shape_wide"])
    schedule = DDIMSchedule.from_scheduler(
        DDIMScheduler.from_pretrained(ROOT / "models" / "toy-sd", subfolder="scheduler"), wide.sample.num_steps)
    steps = trainable_steps(schedule, wide.sample.eta, wide.train.min_sigma, max_step_gain=wide.train.max_step_gain)
    assert steps.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    demo = evidence.load_config(ROOT / "configs" / "tiny.yaml", evidence.TRAINED["texforce_shape"])
    assert trainable_steps(schedule, demo.sample.eta, demo.train.min_sigma).tolist() == [0, 1, 2, 3]


def test_fusion_search_keeps_a_finished_search_and_resumes_one_that_stopped_short(tmp_path, monkeypatch):
    """A search cut short (Ctrl-C, a failed trial) has a best.json too, of the trials it finished: a second run of
    the bench resumes it instead of taking its best for the search's."""
    import fusion_search

    from tune import cli, sweep
    from tune.sweep import SweepSettings, write_sweep_record
    from tune.worker import FusionJob

    loras = []
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"lora " + name.encode())
        loras.append(str(tmp_path / name))
    job = FusionJob(model="m", loras=tuple(loras), prompts=("a red ball",), reward="object_alignment")
    out, calls = tmp_path / "out", []

    def tune_main(argv):
        calls.append(argv)
        (out / "grid").mkdir(parents=True, exist_ok=True)
        (out / "grid" / "best.json").write_text(json.dumps({"num_trials": 4}))
        return 0

    monkeypatch.setattr(cli, "main", tune_main)
    monkeypatch.setattr(sweep, "can_resume", lambda storage: (storage.parent / "best.json").exists())
    assert fusion_search.run_tune("grid", ["--model", "m"], ["--grid", "2"], out, 2) == {"num_trials": 4}
    assert calls == [["tune", "--model", "m", "--grid", "2", "--out", str(out / "grid"), "--num-cpus", "2"]]
    write_sweep_record(job, SweepSettings(search="grid", grid=2), out / "grid")
    fusion_search.run_tune("grid", ["--model", "m"], ["--grid", "2"], out, 2)
    assert len(calls) == 1  # all 4 of its trials finished: kept
    (out / "grid" / "best.json").write_text(json.dumps({"num_trials": 3}))
    assert fusion_search.run_tune("grid", ["--model", "m"], ["--grid", "2"], out, 2) == {"num_trials": 4}
    assert calls[1] == ["tune", "--resume", str(out / "grid"), "--num-cpus", "2"]


def test_fusion_search_runs_both_searches_and_confirms_their_best_on_other_images(
    ray_session, tiny_sd_dir, tmp_path, one_torch_thread
):
    import fusion_search
    from lora_fixtures import make_lora

    from tune.worker import FusionJob, evaluate_alphas

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\n")
    loras = [str(make_lora(tiny_sd_dir, tmp_path / name, rank=4, alpha=4, seed=seed, policy="text_encoder", scale=1.0))
             for name, seed in (("first", 1), ("second", 2))]
    out = tmp_path / "search"
    overrides = [f"model.pretrained={tiny_sd_dir}", "sample.num_steps=4", f"evaluation.prompts_file={held_out}"]
    # the grid's 4 points are the corners, the search's first 4 trials too: a fifth is drawn at random
    assert fusion_search.main(["--loras", *loras, "--out", str(out), "--grid", "2", "--num-samples", "5",
                               "--select-seeds", "1", "--confirm-seeds", "2", *overrides]) == 0
    grid = pq.read_table(out / "grid" / "results.parquet").to_pylist()
    search = pq.read_table(out / "search" / "results.parquet").to_pylist()
    assert len(grid) == 4 and len(search) == 5
    assert {(r["alpha_1"], r["alpha_2"]) for r in grid} <= {(r["alpha_1"], r["alpha_2"]) for r in search}

    # confirmed on the held-out evaluation's seeds (not the selection's), as evaluated in this process
    confirm = pq.read_table(out / "confirm.parquet").to_pandas()
    assert len(confirm) == 4 and set(confirm["seed"]) == {2**31, 2**31 + 1}
    settings = EvalSettings(num_seeds=2, base_seed=2**31, num_steps=4, guidance_scale=5.0, eta=1.0, batch_size=16)
    job = FusionJob(model=tiny_sd_dir, loras=tuple(loras), prompts=("a purple hat", "a white cup"),
                    reward="object_alignment", settings=settings, device="cpu")
    best = json.loads((out / "grid" / "best.json").read_text())["alphas"]
    column = next(c for c in confirm.columns if c.startswith("best of the 2x2 grid"))
    assert confirm[column].to_numpy() == pytest.approx(evaluate_alphas(job, best).objective, abs=1e-6)
    assert confirm["both at 1"].to_numpy() == pytest.approx(evaluate_alphas(job, [1.0, 1.0]).objective, abs=1e-6)
    table = (out / "fusion_search.md").read_text()
    assert "| base | (0.00, 0.00) |" in table and "| both at 1 | (1.00, 1.00) |" in table
    assert (out / "fusion_search.png").stat().st_size > 5000

    # finished searches are reused
    written = (out / "grid" / "results.parquet").stat().st_mtime_ns
    assert fusion_search.main(["--loras", *loras, "--out", str(out), "--grid", "2", "--num-samples", "5",
                               "--select-seeds", "1", "--confirm-seeds", "2", *overrides]) == 0
    assert (out / "grid" / "results.parquet").stat().st_mtime_ns == written
