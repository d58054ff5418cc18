"""`texforce rewards list` and `texforce score`, through `rewards.cli.add_subcommands`."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rewards import cli

pytest_plugins = ("rewards_fixtures",)  # the session fixture tiny_reward_files (see test_rewards_models)
if TYPE_CHECKING:
    from rewards_fixtures import TinyRewardFiles


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="texforce")
    cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    colors = {"b_red.png": (255, 0, 0), "a_blue.png": (0, 0, 255), "c_noise.png": None}
    for name, rgb in colors.items():
        array = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) if rgb is None else np.full((24, 32, 3), rgb, np.uint8)
        Image.fromarray(array).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_rewards_list(capsys):
    assert run(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    assert "imagereward  differentiable=yes" in out
    assert "jpeg_compressibility  differentiable=no" in out
    assert "imagereward: ImageReward.pt from THUDM/ImageReward" in out
    assert "[env TEXFORCE_HPS_TOKENIZER]" in out
    assert "color_alignment  differentiable=yes" in out and "files: none" in out


def test_score_writes_per_image_parquet(image_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a blue car\na red ball\na gray wall\n")  # sorted file order: a_, b_, c_
    out = tmp_path / "out" / "scores.parquet"
    code = run(["score", "--reward", "color_alignment:1,jpeg_compressibility:0.1", "--images", str(image_dir),
                "--prompts", str(prompts), "--out", str(out), "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    table = pq.read_table(out).to_pylist()
    assert [r["file"] for r in table] == ["a_blue.png", "b_red.png", "c_noise.png"]
    assert [r["prompt"] for r in table] == ["a photo of a blue car", "a red ball", "a gray wall"]
    assert table[0]["color_alignment"] == pytest.approx(1.0, abs=1e-3)
    assert table[1]["color_alignment"] == pytest.approx(1.0, abs=1e-3)
    for row in table:
        assert row["score"] == pytest.approx(row["color_alignment"] + 0.1 * row["jpeg_compressibility"], abs=1e-5)
    assert "scored 3 images" in capsys.readouterr().out


def test_score_single_prompt_for_all_and_model_paths(image_dir, tmp_path, tiny_reward_files: TinyRewardFiles):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n\n")
    out = tmp_path / "scores.parquet"
    paths = [f"{k}={v}" for k, v in tiny_reward_files.paths.items() if k.startswith("hps")]
    code = run(["score", "--reward", "hpsv2", "--images", str(image_dir), "--prompts", str(prompts),
                "--out", str(out), "--paths", *paths])
    assert code == 0
    table = pq.read_table(out).to_pylist()
    assert {r["prompt"] for r in table} == {"a red ball"} and len(table) == 3
    assert all(np.isfinite(r["hpsv2"]) for r in table)


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n \n", "is empty"),
    ("one\ntwo\n", "has 2 prompts for 3 images"),
])
def test_score_prompt_file_errors(image_dir, tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    assert run(["score", "--reward", "brightness", "--images", str(image_dir), "--prompts", str(prompts),
                "--out", str(tmp_path / "s.parquet")]) == 2
    assert message in capsys.readouterr().err


def test_score_reports_missing_model_files(image_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TEXFORCE_IMAGEREWARD", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    assert run(["score", "--reward", "imagereward", "--images", str(image_dir), "--prompts", str(prompts),
                "--out", str(tmp_path / "s.parquet")]) == 2
    assert "ImageReward.pt from THUDM/ImageReward" in capsys.readouterr().err
    assert run(["score", "--reward", "nope", "--images", str(image_dir), "--prompts", str(prompts)]) == 2
    assert "valid rewards:" in capsys.readouterr().err


def test_load_image_matches_tensor_convention(image_dir):
    image = cli.load_image(image_dir / "b_red.png")
    assert image.shape == (3, 24, 32) and image.dtype == torch.float32
    assert image[0].min() == 1.0 and image[1:].max() == 0.0
