"""`texforce rewards list` and `texforce score`, through the `texforce` entry (rl.cli.main)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rewards import cli
from conftest import one_line_error

pytest_plugins = ("rewards_fixtures",)  # the session fixture tiny_reward_files (see test_rewards_models)
if TYPE_CHECKING:
    from rewards_fixtures import TinyRewardFiles


def run(argv: list[str]) -> int:
    from rl.cli import main

    return main(argv)




@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    colors = {"b_red.png": (255, 0, 0), "a_blue.png": (0, 0, 255), "c_noise.PNG": None}
    for name, rgb in colors.items():
        shape = (20, 28, 3) if name == "a_blue.png" else (24, 32, 3)  # a batch holds images of one size
        array = rng.integers(0, 256, shape, dtype=np.uint8) if rgb is None else np.full(shape, rgb, np.uint8)
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
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "scoring with color_alignment" in captured.err and "0/3" in captured.err  # a progress bar over the images
    table = pq.read_table(out).to_pylist()
    assert [r["file"] for r in table] == ["a_blue.png", "b_red.png", "c_noise.PNG"]
    assert [r["prompt"] for r in table] == ["a photo of a blue car", "a red ball", "a gray wall"]
    assert table[0]["color_alignment"] == pytest.approx(1.0, abs=1e-3)
    assert table[1]["color_alignment"] == pytest.approx(1.0, abs=1e-3)
    for row in table:
        assert row["score"] == pytest.approx(row["color_alignment"] + 0.1 * row["jpeg_compressibility"], abs=1e-5)
    assert "scored 3 images" in captured.out


def test_score_single_prompt_for_all_and_model_paths(image_dir, tmp_path, tiny_reward_files: TinyRewardFiles):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n\n")
    out = tmp_path / "scores.parquet"
    paths = [f"{k}={v}" for k, v in tiny_reward_files.paths.items() if k in ("hpsv2", "hps_tokenizer")]
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
    (b"a red ball\n\xff a blue car\n", "line 2 is not UTF-8 text; save it as UTF-8"),
    (None, "prompts file {prompts} not found"),
])
def test_score_prompt_file_errors(image_dir, tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = message.format(prompts=prompts)
    assert message in one_line_error(capsys, run(["score", "--reward", "brightness", "--images", str(image_dir),
                                                 "--prompts", str(prompts), "--out", str(tmp_path / "s.parquet")]))


def test_score_reports_missing_model_files(image_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TEXFORCE_IMAGEREWARD", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    line = one_line_error(capsys, run(["score", "--reward", "imagereward", "--images", str(image_dir),
                                       "--prompts", str(prompts), "--out", str(tmp_path / "s.parquet")]))
    assert line.startswith("texforce score: reward 'imagereward': no path given for 'imagereward'")
    assert "ImageReward.pt from THUDM/ImageReward" in line and "--paths imagereward=PATH" in line
    line = one_line_error(capsys, run(["score", "--reward", "nope", "--images", str(image_dir), "--prompts", str(prompts)]))
    assert "unknown reward 'nope'; valid rewards:" in line


@pytest.mark.parametrize("images, extra, message", [
    ("missing", [], "texforce score: image directory {images} not found"),
    ("empty", [], "texforce score: no images (.png, .jpg, .jpeg, .webp, .bmp) in {images}"),
    ("images", ["--batch-size", "0"], "texforce score: --batch-size must be at least 1, got 0"),
])
def test_score_bad_inputs_are_one_line(image_dir, tmp_path, capsys, images, extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    folder = tmp_path / images
    line = one_line_error(capsys, run(["score", "--reward", "brightness", "--images", str(folder), "--prompts",
                                       str(prompts), "--out", str(tmp_path / "s.parquet"), *extra]))
    assert line == message.format(images=folder)


def test_score_warns_of_non_finite_scores_and_averages_the_others(image_dir, tmp_path, capsys, monkeypatch):
    class GreenOrNaNForRed:  # a reward that fails on one image
        name = "green"

        def __call__(self, images, prompts):
            scores = images[:, 1].mean((1, 2)).double()
            return SimpleNamespace(scores=torch.where(images[:, 0].mean((1, 2)) == 1.0, float("nan"), scores), parts={})

    monkeypatch.setattr("rewards.registry.build_reward", lambda *a, **k: GreenOrNaNForRed())
    out = tmp_path / "s.parquet"
    assert _score(image_dir, tmp_path, "--out", str(out)) == 0
    scores = [row["score"] for row in pq.read_table(out).to_pylist()]  # a_blue, b_red, c_noise
    assert scores[0] == 0.0 and np.isnan(scores[1])
    captured = capsys.readouterr()
    assert f"mean {scores[2] / 2:.4f}" in captured.out
    assert "warning: non-finite scores for 1 images: b_red.png" in captured.err


def test_paths_are_checked():
    assert cli.parse_paths(["imagereward= /ckpt/ImageReward.pt"]) == {"imagereward": "/ckpt/ImageReward.pt"}
    for item in ("imagereward=", "=/ckpt/ImageReward.pt", "/ckpt/ImageReward.pt"):
        with pytest.raises(cli.RewardError, match="--paths takes KEY=PATH items"):
            cli.parse_paths([item])


def test_load_image_matches_tensor_convention(image_dir):
    image = cli.load_image(image_dir / "b_red.png")
    assert image.shape == (3, 24, 32) and image.dtype == torch.float32
    assert image[0].min() == 1.0 and image[1:].max() == 0.0


def _score(image_dir, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    return run(["score", "--reward", "brightness", "--images", str(image_dir), "--prompts", str(prompts), *extra])


def test_corrupt_image_is_named_before_scoring(image_dir, tmp_path, capsys):
    (image_dir / "d_broken.png").write_bytes((image_dir / "a_blue.png").read_bytes()[:40])
    (image_dir / "e_text.jpg").write_text("not a jpeg")
    out = tmp_path / "s.parquet"
    line = one_line_error(capsys, _score(image_dir, tmp_path, "--out", str(out)))
    assert line.startswith(f"texforce score: {image_dir / 'd_broken.png'} is not a readable image")
    assert line.endswith("remove or replace it") and not out.exists()


def test_out_that_is_a_directory(image_dir, tmp_path, capsys):
    line = one_line_error(capsys, _score(image_dir, tmp_path, "--out", str(tmp_path)))
    assert line == (f"texforce score: --out {tmp_path} is a directory; give the parquet file to write, "
                    f"e.g. {tmp_path / 'scores.parquet'}")


def test_score_refuses_an_existing_out_and_an_unknown_paths_key(image_dir, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"keep me")
    line = one_line_error(capsys, _score(image_dir, tmp_path, "--out", str(out)))
    assert line == f"texforce score: {out} already exists; remove it or choose another --out"
    assert out.read_bytes() == b"keep me"
    new = tmp_path / "new.parquet"
    line = one_line_error(capsys, _score(image_dir, tmp_path, "--out", str(new), "--paths", "foo=/x"))
    assert line == ("texforce score: no reward of 'brightness' reads a file under the key 'foo'; it reads no files: "
                    "drop the key")
    assert not new.exists()


def test_a_device_this_machine_lacks_or_no_device_at_all_is_one_line(image_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = str(tmp_path / "s.parquet")
    line = one_line_error(capsys, _score(image_dir, tmp_path, "--out", out, "--device", "cuda:0"))
    assert line == "texforce score: --device=cuda:0: this machine has no CUDA device; use --device=cpu (or auto)"
    line = one_line_error(capsys, _score(image_dir, tmp_path, "--out", out, "--device", "gpu"))
    assert line == "texforce score: --device='gpu' is not a torch device; use auto, cpu, cuda or cuda:N"


def test_sixteen_bit_images_keep_their_range(tmp_path):
    grey = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 85).astype(np.uint16)  # up to 65195
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = cli.load_image(tmp_path / "g16.png")
    assert image.shape == (3, 24, 32)
    expected = torch.from_numpy(grey.astype(np.float32) / 65535)
    for channel in image:
        torch.testing.assert_close(channel, expected)
    eight = np.full((4, 4, 3), 128, np.uint8)
    Image.fromarray(eight).save(tmp_path / "rgb8.png")
    assert torch.allclose(cli.load_image(tmp_path / "rgb8.png"), torch.full((3, 4, 4), 128 / 255))
    # 16-bit RGB (PIL cannot write it): PIL reads it as 8-bit RGB, within one 8-bit step
    rgb16 = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000).astype(">u2")
    _write_png16_rgb(tmp_path / "rgb16.png", rgb16)
    expected = torch.from_numpy(rgb16.astype(np.float32) / 65535).permute(2, 0, 1)
    assert (cli.load_image(tmp_path / "rgb16.png") - expected).abs().max() <= 1 / 255


def _write_png16_rgb(path, array) -> None:
    """A minimal 16-bit RGB PNG: IHDR (bit depth 16, colour type 2), one IDAT, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = array.shape
    rows = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
