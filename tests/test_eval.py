"""`texforce eval`: a fixed, seeded evaluation set with per-image scores, a summary and a grid."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import one_line_error
from lora_fixtures import make_lora

from tune.evaluate import (
    EvalResult,
    EvalSettings,
    clustered_sem,
    eval_set,
    evaluate,
    generate,
    paired_gain,
    score,
    seeds_and_prompts_sem,
    summarize,
    write_outputs,
)
from tune.fusion import fuse_files, load_fused
from tune.worker import LOADS, FusionJob, evaluate_alphas

SETTINGS = EvalSettings(num_seeds=2, num_steps=3, batch_size=3)
PROMPTS = ("a red ball", "a blue car", "a green tree")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_pair(tiny_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-loras")
    targets = ["conv_in", "conv_out", "to_q", "to_v"]
    return (
        make_lora(tiny_sd_dir, root / "x", rank=4, alpha=4, seed=5, policy="both", scale=0.3, unet_targets=targets),
        make_lora(tiny_sd_dir, root / "y", rank=2, alpha=2, seed=6, policy="unet", scale=0.3, unet_targets=targets),
    )


def test_summary_statistics():
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0]))
    assert s["mean"] == 2.5 and s["n"] == 4
    assert math.isclose(s["std"], np.std([1, 2, 3, 4], ddof=1))
    assert math.isclose(s["sem"], s["std"] / 2)
    assert summarize(np.array([0.5]))["std"] == 0.0


def test_clustered_standard_error_counts_prompts_not_images():
    """A training epoch draws prompts and samples 8 images of each; its mean's standard error is over the prompts."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=40)
    assert math.isclose(clustered_sem(values, [f"p{i}" for i in range(40)]), summarize(values)["sem"])  # one each
    # equal-sized clusters: the standard error of the cluster means
    prompt_effect = rng.normal(size=10)
    values = np.repeat(prompt_effect, 8) + 0.1 * rng.normal(size=80)
    prompts = np.repeat([f"a {i} ball" for i in range(10)], 8)
    cluster_means = values.reshape(10, 8).mean(1)
    assert math.isclose(clustered_sem(values, prompts), cluster_means.std(ddof=1) / math.sqrt(10))
    assert clustered_sem(values, prompts) > 2.5 * summarize(values)["sem"]  # what std / sqrt(n) would hide
    order = rng.permutation(80)  # which image comes first does not matter; a prompt drawn twice is one cluster
    assert math.isclose(clustered_sem(values[order], prompts[order]), clustered_sem(values, prompts))
    assert clustered_sem(values[:8], prompts[:8]) == summarize(values[:8])["sem"]  # one prompt: its images
    # a paired gain: over these prompts' images, and over the prompts as a draw (non-finite pairs left out of both)
    before, after = values.copy(), values + np.repeat(rng.normal(0.1, 0.2, size=10), 8)
    before[3] = np.nan
    gain = paired_gain(before, after, list(prompts))
    kept = np.arange(80) != 3
    assert math.isclose(gain["sem"], summarize((after - before)[kept])["sem"])
    assert math.isclose(gain["sem_over_prompts"], clustered_sem((after - before)[kept], prompts[kept]))
    assert "sem_over_prompts" not in paired_gain(before, after)


def test_the_seeds_and_prompts_standard_error_counts_how_training_seeds_differ():
    """3 training seeds x 20 held-out prompts, each seed with its own gain on every prompt: the standard error of the
    grand mean counts the seeds' spread, which the prompts' spread alone cancels out."""
    rng = np.random.default_rng(0)
    one_seed = rng.normal(size=(1, 20))
    assert math.isclose(seeds_and_prompts_sem(one_seed), one_seed.std(ddof=1) / math.sqrt(20))
    one_prompt = rng.normal(size=(5, 1))
    assert math.isclose(seeds_and_prompts_sem(one_prompt), one_prompt.std(ddof=1) / math.sqrt(5))
    means, estimates, prompts_only = [], [], []
    for _ in range(3000):  # seeds' sd 0.03, prompts' 0.05, the rest 0.02: the true SE is about 0.021
        gains = rng.normal(0, 0.03, (3, 1)) + rng.normal(0, 0.05, (1, 20)) + rng.normal(0, 0.02, (3, 20))
        means.append(gains.mean())
        estimates.append(seeds_and_prompts_sem(gains))
        prompts_only.append(gains.mean(axis=0).std(ddof=1) / math.sqrt(20))
    true_se = float(np.std(means))
    assert 0.9 < math.sqrt(np.mean(np.square(estimates))) / true_se < 1.1
    assert math.sqrt(np.mean(np.square(prompts_only))) / true_se < 0.65  # what the prompts alone claimed


def test_a_pair_is_left_out_when_either_of_its_scores_is_not_finite():
    """An image whose score after training is NaN or inf is as unusable as one whose score before is."""
    before, after = np.array([0.0, 1.0, 2.0, np.nan]), np.array([0.5, np.inf, 2.5, 3.0])
    gain = paired_gain(before, after, ["a", "a", "b", "b"])
    assert (gain["n"], gain["mean"], gain["std"]) == (2, 0.5, 0.0) and math.isfinite(gain["sem_over_prompts"])


def test_the_seeds_and_prompts_standard_error_is_at_least_either_ones_alone():
    """Seeds whose mean gains agree, with a large seed-by-prompt interaction: the ANOVA sum goes negative, and the
    estimate falls back to the prompts' standard error (1/3 here), not to zero; transposed, to the seeds'."""
    gains = np.array([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])  # prompt means 0, 0, 1: their SE is 1/3
    assert seeds_and_prompts_sem(gains) == pytest.approx(gains.mean(axis=0).std(ddof=1) / math.sqrt(3))
    assert seeds_and_prompts_sem(gains.T) == pytest.approx(1 / 3)


def test_the_batch_sizes_change_neither_the_images_nor_their_scores(pipe):
    """Image j of a prompt is drawn from seed base_seed + j whatever batch it falls in, and is scored against its own
    prompt: batches of 3 images (and scoring batches of 2) give what one batch gives."""
    from rewards import build_reward

    prompts, seeds = eval_set(list(PROMPTS), SETTINGS)
    images = generate(pipe, prompts, seeds, SETTINGS)  # batches of 3
    assert torch.equal(images, generate(pipe, prompts, seeds, replace(SETTINGS, batch_size=len(prompts))))
    reward = build_reward("color_alignment")
    parts, objective = score(reward, images, prompts, batch_size=2)
    one_parts, one_objective = score(reward, images, prompts)
    np.testing.assert_allclose(objective, one_objective, rtol=1e-6)
    np.testing.assert_allclose(parts["color_alignment"], one_parts["color_alignment"], rtol=1e-6)


def test_the_written_summary_has_the_objective_beside_each_reward(tmp_path):
    """summary.json summarises the weighted objective too: what a sweep ranks trials by."""
    result = EvalResult(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), prompts=["a", "a", "b", "b"],
                        seeds=[0, 1, 0, 1], scores={"brightness": np.array([0.1, 0.2, 0.3, 0.4])},
                        objective=np.array([0.2, 0.4, 0.6, 0.9]))
    paths = write_outputs(result, tmp_path, extra={"alphas": [0.5]})
    summary = json.loads(paths["summary"].read_text())
    assert summary["rewards"]["objective"] == pytest.approx(summarize(result.objective))
    assert summary["rewards"]["brightness"] == pytest.approx(summarize(result.scores["brightness"]))
    assert summary["alphas"] == [0.5]


def test_eval_cli_writes_scores_summary_and_grid(tiny_sd_dir, lora_pair, tmp_path, capsys):
    from rl.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "eval"
    argv = ["eval", "--model", tiny_sd_dir, "--lora", f"{lora_pair[0]}:0.7", "--lora", f"{lora_pair[1]}:0.3",
            "--prompts", str(prompts), "--reward", "color_alignment,brightness", "--seeds", "2", "--steps", "3",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "color_alignment" in printed.out and "sampling 6 images" in printed.err  # a bar while it samples
    table = pq.read_table(out / "scores.parquet").to_pydict()
    assert table["prompt"] == [p for p in PROMPTS for _ in range(2)] and table["seed"] == [0, 1] * 3
    assert table["image"] == list(range(6))
    summary = json.loads((out / "summary.json").read_text())
    for name in ("color_alignment", "brightness"):
        s = summary["rewards"][name]
        assert set(s) == {"mean", "std", "sem", "n"} and s["n"] == 6
        assert math.isclose(s["mean"], float(np.mean(table[name])), rel_tol=1e-9)
    assert summary["alphas"] == [0.7, 0.3]
    assert (out / "grid.png").stat().st_size > 1000

    assert main(argv[:-1] + [str(tmp_path / "again"), "--save-images"]) == 0  # same seeds, same scores
    again = pq.read_table(tmp_path / "again" / "scores.parquet").to_pydict()
    assert again["color_alignment"] == table["color_alignment"]
    assert not (out / "images").exists()  # only when asked
    # the saved images and prompts, scored by `texforce score`, score as the evaluation scored them
    images = tmp_path / "again" / "images"
    assert sorted(p.name for p in images.iterdir()) == [f"{i:05d}.png" for i in range(6)] + ["prompts.txt"]
    assert (images / "prompts.txt").read_text().splitlines() == table["prompt"]
    assert main(["score", "--reward", "color_alignment,brightness", "--images", str(images), "--prompts",
                 str(images / "prompts.txt"), "--out", str(tmp_path / "rescored.parquet")]) == 0
    rescored = pq.read_table(tmp_path / "rescored.parquet").to_pydict()
    for name in ("color_alignment", "brightness"):
        np.testing.assert_allclose(rescored[name], table[name], rtol=1e-6)


def test_cached_pipeline_with_swapped_loras_matches_a_fresh_load(tiny_sd_dir, lora_pair):
    """A worker reuses one pipeline across trials; the swap must leave nothing behind."""
    from rewards import build_reward
    from rl.models import load_pipeline

    job = FusionJob(model=tiny_sd_dir, loras=tuple(str(p) for p in lora_pair), prompts=PROMPTS,
                    reward="color_alignment", settings=SETTINGS, device="cpu")
    evaluate_alphas(job, [2.0, -1.0])  # another trial first, on the cached pipeline
    loads = LOADS["pipeline"]
    reused = evaluate_alphas(job, [0.5, 0.8])
    assert LOADS["pipeline"] == loads

    fresh_pipe = load_pipeline(tiny_sd_dir, device="cpu")
    load_fused(fresh_pipe, fuse_files(lora_pair, [0.5, 0.8]))
    fresh = evaluate(fresh_pipe, build_reward("color_alignment"), list(PROMPTS), SETTINGS)
    assert torch.equal(reused.images, fresh.images)
    np.testing.assert_array_equal(reused.objective, fresh.objective)

    bare = evaluate_alphas(replace(job, loras=()), [])  # the base model (no --lora) after a LoRA: it is unloaded
    base = evaluate_alphas(job, [0.0, 0.0])
    plain = evaluate(load_pipeline(tiny_sd_dir, device="cpu"), build_reward("color_alignment"), list(PROMPTS), SETTINGS)
    assert torch.equal(base.images, plain.images) and torch.equal(bare.images, plain.images)
    assert not torch.equal(base.images, reused.images)
    # --device auto (the default) runs on the device it resolves to
    assert evaluate_alphas(replace(job, device="auto"), [0.5, 0.8]).objective.shape == reused.objective.shape


def test_a_worker_loads_a_pipeline_once_per_model_device_and_dtype(tiny_sd_dir, monkeypatch):
    from tune import worker

    monkeypatch.setattr(worker, "_PIPELINES", {})
    monkeypatch.setitem(LOADS, "pipeline", 0)
    pipe = worker.cached_pipeline(tiny_sd_dir, "cpu", "float32")
    assert worker.cached_pipeline(tiny_sd_dir, "cpu", "float32") is pipe and LOADS["pipeline"] == 1
    half = worker.cached_pipeline(tiny_sd_dir, "cpu", "bfloat16")
    assert (pipe.unet.dtype, half.unet.dtype, LOADS["pipeline"]) == (torch.float32, torch.bfloat16, 2)


# --- bad input: one line and exit code 2, before any model loads ---------------------------------




@pytest.fixture
def eval_args(tiny_sd_dir, tmp_path, monkeypatch):
    """A valid `texforce eval` command line, and a guard that no pipeline is loaded."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    monkeypatch.setattr("tune.worker.cached_pipeline", lambda *a: pytest.fail("loaded the model before checking"))
    return ["eval", "--model", tiny_sd_dir, "--prompts", str(prompts), "--reward", "brightness", "--device", "cpu",
            "--steps", "2", "--out", str(tmp_path / "eval")]


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "texforce eval: --steps must be at least 1, got 0"),
    ("--seeds", "0", "texforce eval: --seeds must be at least 1, got 0"),
    ("--eta", "1.5", "texforce eval: --eta must be in [0, 1] (0: deterministic DDIM), got 1.5"),
    ("--base-seed", "-1", "texforce eval: --base-seed must be in [0, 2**63 - --seeds] (image j's seed is BASE_SEED + j)"),
    ("--base-seed", str(2**63 - 1), f"got {2**63 - 1}"),  # its second image's seed would not fit an int64
    ("--guidance", "inf", "texforce eval: --guidance must be >= 0 (1 = the conditional prediction alone), got inf"),
    ("--batch-size", "0", "texforce eval: --batch-size must be at least 1, got 0"),
    ("--reward", "brightness:nan", "must be a finite number"),
    ("--reward", "aesthetic", "reward 'aesthetic': no path given for 'aesthetic'"),
    ("--model", "/nonexistent/sd", "texforce eval: model directory not found: /nonexistent/sd"),
    ("--paths", "brightnes=/x", "no reward of 'brightness' reads a file under the key 'brightnes'; it reads no files"),
])
def test_eval_bad_inputs_are_one_line(eval_args, capsys, monkeypatch, option, value, message):
    from rl.cli import main

    monkeypatch.delenv("TEXFORCE_AESTHETIC", raising=False)
    assert message in one_line_error(capsys, main(eval_args + [option, value]))  # the last value given wins


def test_an_eval_interrupted_while_writing_leaves_whole_files_only(eval_args, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the grid was saved left a truncated grid.png that image readers refuse."""
    from rl.cli import main
    from rl.models import load_pipeline

    def interrupted_save(images, captions, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr("tune.worker.cached_pipeline", lambda *a: load_pipeline(eval_args[2], device="cpu"))
    monkeypatch.setattr("rl.plots.save_image_grid", interrupted_save)
    assert main(eval_args + ["--seeds", "1"]) == 130
    out = tmp_path / "eval"
    assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "summary.json"]  # no grid, whole or not
    assert pq.read_table(out / "scores.parquet").num_rows == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "texforce eval: interrupted"


def test_eval_weighs_a_lora_without_alpha_1_and_warns_of_long_prompts_before_sampling(
        eval_args, lora_pair, tmp_path, caplog, monkeypatch):
    from rl.cli import main

    asked = []

    def sample(job, alphas, **kwargs):
        asked.append(list(alphas))
        raise KeyboardInterrupt  # stop before the sampling

    monkeypatch.setattr("tune.worker.evaluate_alphas", sample)
    prompts = tmp_path / "long.txt"
    prompts.write_text("a red ball on a green table " * 20 + "\n")
    with caplog.at_level("WARNING"):
        assert main(eval_args + ["--lora", str(lora_pair[0]), "--lora", f"{lora_pair[1]}:0.5",
                                 "--prompts", str(prompts)]) == 130
    assert asked == [[1.0, 0.5]]
    assert f"1 of 1 prompts in {prompts} are longer than the tokenizer's" in caplog.text


def test_eval_empty_prompt_file(eval_args, tmp_path, capsys):
    from rl.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    line = one_line_error(capsys, main(eval_args + ["--prompts", str(empty)]))
    assert line == f"texforce eval: prompt file {empty} has no prompts; write one prompt per line"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_eval_cuda_device_without_cuda(eval_args, capsys):
    from rl.cli import main

    line = one_line_error(capsys, main(eval_args + ["--device", "cuda:0"]))
    assert line == "texforce eval: --device=cuda:0: this machine has no CUDA device; use --device=cpu (or auto)"


def test_eval_names_a_lora_of_another_base_model(eval_args, tmp_path, capsys):
    from rl.cli import main
    from tune.lora_io import write_lora

    lora = write_lora({"unet.conv_in": (torch.zeros(2, 8, 3, 3), torch.zeros(32, 2, 1, 1))}, tmp_path / "other.safetensors")
    line = one_line_error(capsys, main(eval_args + ["--lora", f"{lora}:0.5"]))
    assert line.startswith(f"texforce eval: {lora} adapts unet.conv_in as a (32, 8, 3, 3) weight but the model")
    assert "trained on another base model; pass that model with --model" in line


def test_eval_refuses_a_lora_with_nan_weights(eval_args, tmp_path, capsys):
    from rl.cli import main
    from tune.lora_io import write_lora

    down = torch.zeros(2, 8, 3, 3)
    down[1, 0, 0, 0] = float("nan")
    lora = write_lora({"unet.conv_in": (down, torch.zeros(32, 2, 1, 1))}, tmp_path / "nan.safetensors")
    line = one_line_error(capsys, main(eval_args + ["--lora", str(lora)]))
    assert line.startswith(f"texforce eval: {lora}: module unet.conv_in has NaN or inf values in its down matrix")
    assert not (tmp_path / "eval").exists()


def test_eval_refuses_existing_outputs_before_the_work(eval_args, tmp_path, capsys):
    from rl.cli import main

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text("{}")
    line = one_line_error(capsys, main(eval_args))
    assert line == f"texforce eval: {tmp_path / 'eval' / 'summary.json'} already exists; remove it or choose another --out"
    assert (tmp_path / "eval" / "summary.json").read_text() == "{}"


def test_eval_refuses_an_existing_images_folder_only_when_it_would_write_one(eval_args, tmp_path, capsys):
    from rl.cli import main

    (tmp_path / "eval" / "images").mkdir(parents=True)
    line = one_line_error(capsys, main([*eval_args, "--save-images"]))
    images = tmp_path / "eval" / "images"
    assert line == f"texforce eval: {images} already exists; remove it or choose another --out"
