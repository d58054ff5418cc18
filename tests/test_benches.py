"""The performance benchmarks run end to end on the tiny model (their figures come from the
README's commands on the real sizes; here only that they measure what they say)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cpu_half_attention  # noqa: E402
import end_to_end  # noqa: E402
import kl_gradient_precision  # noqa: E402
import latent_storage  # noqa: E402
import learner_overhead  # noqa: E402
import noise_shares  # noqa: E402
import sd15_shaped  # noqa: E402
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



def test_latent_storage_bench_compares_each_storage_dtype_with_float32(tiny_sd_dir, tmp_path, one_torch_thread):
    result = latent_storage.main(["--pretrained", tiny_sd_dir, "--rows", "2", "--num-steps", "3",
                                  "--out", str(tmp_path)])
    assert result == json.loads((tmp_path / "latent_storage.json").read_text())
    rows = result["dtypes"]
    assert set(rows) == {"float32", "float16", "bfloat16"}
    assert rows["float16"]["bytes_per_sample"] < 0.6 * rows["float32"]["bytes_per_sample"]
    for name, row in rows.items():
        assert len(row["gradient_cosine_per_step"]) == len(row["mismatch_rounded_chain"]) == 3
        assert max(row["mismatch_rounded_chain"]) < 1e-5  # every dtype's stored chain is scored as stored
        if name == "float32":  # the reference against itself
            assert row["gradient_cosine_per_step"] == pytest.approx([1.0] * 3) and max(row["mismatch_cast_afterwards"]) == 0
        else:
            assert max(row["mismatch_cast_afterwards"]) > 0 and row["final_latent_relative_difference"] > 0


def test_cpu_half_attention_bench_times_both_attentions_and_float32(tiny_sd_dir, tmp_path, one_torch_thread):
    out = tmp_path / "attention.json"
    cpu_half_attention.main([tiny_sd_dir, "--repeats", "1", "--threads", "1", "--out", str(out),
                             "sample.num_steps=4", "train.min_sigma=0", "sample.batch_size=2", "train.batch_size=2"])
    result = json.loads(out.read_text())
    assert set(result["medians"]) == {"bfloat16, float32 attention", "bfloat16, bfloat16 attention", "float32"}
    assert all(set(phases) == {"learner minibatch", "sampling batch"} and min(phases.values()) > 0
               for phases in result["medians"].values())


def test_kl_gradient_precision_reads_the_runs_last_checkpoint(tiny_sd_dir, pipe, tmp_path, one_torch_thread):
    from conftest import perturb_lora, tiny_config

    from rl.learner import PPOLearner
    from rl.run_dir import RunDirectory, pack_learner_state

    config = tiny_config(tiny_sd_dir, "sample.num_steps=4", "train.min_sigma=0")
    learner = PPOLearner(pipe, config)
    perturb_lora(learner.params, scale=0.03)  # away from the base model, so the KL term has a gradient
    (tmp_path / "run").mkdir()
    run = RunDirectory(tmp_path / "run")
    run.save_config(config)
    run.save_checkpoint(0, learner_state=pack_learner_state(learner.state_dict()), driver_state={},
                        weights=learner.get_weights(), config=config)
    result = kl_gradient_precision.main([str(run.path), "--rows", "2", "--threads", "1"])
    assert result["checkpoint"].endswith("epoch_0000")
    kl_term, surrogate = result["terms"]["KL term (advantages 0)"], result["terms"]["surrogate (no KL)"]
    assert kl_term["kl_to_base_float32"] > 0 and kl_term["kl_to_base_bfloat16"] > 0
    for row in (kl_term, surrogate):  # near the float32 gradient, not equal to it
        assert 0.9 < row["cosine"] < 1.0 and 0.5 < row["norm_ratio"] < 2.0
    assert (run.path / "kl_gradient_precision.json").is_file()

def test_end_to_end_summary_times_epochs_after_warmup_per_arm_and_compares_arms():
    runs = [{"arm": "trl", "samples_per_epoch": 100, "epoch_ends": [0.0, 9.0, 19.0, 29.0]},
            {"arm": "ray", "samples_per_epoch": 100, "epoch_ends": [0.0, 7.0, 12.0, 17.0]},
            {"arm": "ray_async", "samples_per_epoch": 100, "epoch_ends": [0.0, 3.0, 7.0, 11.0]},
            {"arm": "trl", "samples_per_epoch": 100, "epoch_ends": [1.0, 2.0, 12.0, 22.0]},
            {"arm": "inline", "samples_per_epoch": 100, "epoch_ends": [0.0, 5.0, 10.0, 14.0]},
            {"arm": "inline_no_outputs", "samples_per_epoch": 100, "epoch_ends": [0.0, 1.0, 2.0, 3.0, 7.0]}]
    table = end_to_end.summarize(runs, warmup=2)  # epoch 0 has no period; epoch 1's is left out too
    assert table["trl"] == {"epochs_timed": 4, "median_epoch_seconds": 10.0, "mean_epoch_seconds": 10.0,
                            "samples_per_second": 10.0}
    assert table["ray"]["median_epoch_seconds"] == 5.0 and table["ray_async"]["samples_per_second"] == 25.0
    assert table["inline_no_outputs"]["median_epoch_seconds"] == 1.0  # the mean counts the slow epoch (a plot):
    assert table["inline_no_outputs"]["mean_epoch_seconds"] == 2.0
    ratios = end_to_end.ratios(table)  # the arm without outputs is no user's run: not in the best
    assert ratios == {"best of this trainer / TRL": 2.5, "Ray async / Ray synchronous": 1.25,
                      "Ray synchronous / in-process": pytest.approx(4.5 / 5),
                      "outputs written / not (in-process)": pytest.approx((100 / 4.5) / 100)}


@pytest.mark.parametrize("arm", ["inline", "inline_no_outputs"])
def test_end_to_end_runs_this_trainer_on_the_shared_work(arm, tiny_sd_dir, tmp_path, one_torch_thread, monkeypatch):
    """One arm, in this process: the run trains the work's U-Net LoRA on brightness and reports its epochs' ends;
    without outputs it writes the metrics rows and no grid."""
    from rl.outputs import EpochOutputs

    monkeypatch.setattr(EpochOutputs, "_write", EpochOutputs._write)  # the arm replaces it in this process
    result = tmp_path / "inline.json"
    end_to_end.main(["--out", str(tmp_path), "--model", tiny_sd_dir, "--run-arm", arm, "--result", str(result),
                     "--epochs", "2", "--warmup", "1", "--steps", "2", "resources.learner_threads=1"])
    run = json.loads(result.read_text())
    assert run["arm"] == arm and run["samples_per_epoch"] == 8 and len(run["epoch_ends"]) == 2
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "policy: unet" in config and "spec: brightness" in config and "mode: inline" in config
    assert (tmp_path / "run" / "grids").exists() == (arm == "inline")


def test_sd15_shaped_pipeline_has_stable_diffusion_15s_parameter_counts():
    """Built on the meta device (no memory): the counts of SD 1.5's published U-Net, VAE and CLIP ViT-L/14 text encoder."""
    import torch

    with torch.device("meta"):
        pipe = sd15_shaped.build_sd15_shaped_pipeline(sample_size=32)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 256


def test_end_to_end_without_trl_is_one_line_naming_the_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        end_to_end.main(["--out", str(tmp_path), "--arms", "trl", "inline"])
    assert exit_info.value.code == 2
    assert '-e ".[bench]"' in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_embedding_headroom_trains_the_offsets_or_a_lora_and_scores_fresh_seeds(tiny_sd_dir, tmp_path, one_torch_thread):
    import embedding_headroom

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue car\na green house\n")
    common = [tiny_sd_dir, "--prompts", str(prompts), "--num-prompts", "2", "--eval-seeds", "2", "--num-steps", "2"]
    result = embedding_headroom.main([*common, "--steps", "2", "--samples-per-prompt", "1", "--lr", "1.0"])
    assert len(result["prompts"]) == 2 and len(result["train_curve"]) == 2 and result["embedding_change"] > 0
    train = result["scores"]["train"]
    assert set(result["scores"]) == {"train"}  # an offset exists only for its own prompt: no held-out scoring
    assert set(train) >= {"reward", "object_alignment_color", "object_alignment_shape"}
    # untrained, the offsets are zero and the scoring (same fresh seeds) gives the same figures twice
    untrained = embedding_headroom.main([*common, "--steps", "0"])
    assert untrained["embedding_change"] == 0
    assert all(row["gain"] == 0 and row["before"] == train[key]["before"] for key, row in untrained["scores"]["train"].items())
    # one LoRA for every prompt: it starts at the base model, moves the train prompts' embeddings, and is scored on
    # the held-out prompts too
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a red car\n")
    lora = embedding_headroom.main([*common, "--steps", "2", "--samples-per-prompt", "1", "--lr", "0.1",
                                    "--parameterisation", "lora", "--held-out-prompts", str(held_out),
                                    "--held-out-seeds", "3"])
    assert lora["prompts"] == result["prompts"] and lora["held_out_prompts"] == ["a red car"]
    assert lora["scores"]["train"]["reward"]["before"] == train["reward"]["before"] and lora["embedding_change"] > 0
    assert set(lora["scores"]) == {"train", "held_out"} and set(lora["scores"]["held_out"]) == set(train)


def test_noise_shares_redraws_one_draw_and_keeps_the_others(tiny_sd_dir, pipe, tmp_path, monkeypatch, one_torch_thread):
    """A row differs from its base sample only through the draw it redraws: with the redraw seeds equal to the
    base seeds, the pieced-together chains reproduce every base sample exactly."""
    import rewards
    from rl.ddim import DDIMSchedule

    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, 3)
    run = {"guidance_scale": 5.0, "size": pipe.unet.config.sample_size * pipe.vae_scale_factor}
    reward, prompts, seeds = rewards.build_reward("brightness"), ["a red ball", "a blue car"], [3, 4]
    base, redrawn = noise_shares.redrawn_rewards(pipe, reward, schedule, prompts, seeds, window=2, **run)
    assert list(redrawn) == ["x_T", "step 0", "step 1", "step 2", "steps 0-1", "steps 2-2", "every step"]
    assert (redrawn["x_T"] != base).all() and (redrawn["steps 0-1"] != base).all()  # another image

    noise_shares.main([tiny_sd_dir, "--reward", "brightness", "--num-steps", "3", "--samples", "8", "--chunk", "4",
                       "--group-size", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "noise_shares.json").read_text())
    assert [s["redrawn"] for s in result["sources"]] == ["x_T", "step 0", "step 1", "step 2", "every step"]
    assert result["sources"][0]["total_share"] > 0 and (tmp_path / "noise_shares.png").stat().st_size > 0

    monkeypatch.setattr(noise_shares, "REDRAW_OFFSET", 0)
    again, same = noise_shares.redrawn_rewards(pipe, reward, schedule, prompts, seeds, window=2, **run)
    assert (again == base).all() and all((rewards_ == base).all() for rewards_ in same.values())


def test_noise_shares_total_share_is_zero_for_a_kept_draw_and_one_for_a_redrawn_score():
    rng = np.random.default_rng(0)
    base = rng.normal(size=4000)
    shares, errors, within = noise_shares.total_shares(base, np.stack([base, rng.normal(size=4000)]), group_size=8)
    assert shares[0] == 0 and abs(shares[1] - 1) < 4 * errors[1] and errors[1] < 0.05
    assert within == pytest.approx(1, abs=0.1)

