"""The command line: `texforce train` and `python -m rl.train` are one entry; bad input fails early.

A user error is one line on stderr and exit code 2, before any work: no run directory is left
behind, so the same command, corrected, starts cleanly. A bug still raises (a traceback).
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rl import cli, train
from rl.run_dir import RunDirectory
from conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")




def tiny_args(tiny_sd_dir, tmp_path, *overrides):
    """A valid small `texforce train` command line on the tiny model (inline: no Ray)."""
    return ["train", f"model.pretrained={tiny_sd_dir}", "model.device=cpu", f"output_dir={tmp_path}",
            "run_name=r", "resources.mode=inline", "sample.num_steps=4", "sample.batch_size=2",
            "sample.num_batches_per_epoch=1", "train.batch_size=2", "num_epochs=1", *overrides]


def test_bad_override_names_the_key(capsys):
    assert train.main(["--config", TINY_YAML, "train.lerning_rate=1"]) == 2
    assert "unknown config key 'train.lerning_rate'; did you mean 'learning_rate'" in capsys.readouterr().err
    assert cli.main(["train", "--config", TINY_YAML, "sample.num_steps=many"]) == 2
    assert "sample.num_steps: expected an int" in capsys.readouterr().err


def test_make_tiny_rejects_bad_step_counts(capsys, tmp_path, monkeypatch):
    first = one_line_error(capsys, cli.main(["make-tiny", str(tmp_path / "m"), "--pretrain-steps", "-1"]))
    assert first == "texforce make-tiny: --pretrain-steps must be >= 0, got -1"
    second = one_line_error(capsys, cli.main(["make-tiny", str(tmp_path / "m"), "--pretrain-steps", "3",
                                             "--vae-steps", "5"]))
    assert "--vae-steps must be in [0, --pretrain-steps), got 5" in second
    monkeypatch.setattr("toyworld.tiny.make_tiny", lambda *a, **k: pytest.fail("built with a refused step count"))
    for vae_steps in ("3", "-1"):  # all 3 steps on the VAE would leave the denoiser untrained
        line = one_line_error(capsys, cli.main(["make-tiny", str(tmp_path / "m"), "--pretrain-steps", "3",
                                                "--vae-steps", vae_steps]))
        assert line == f"texforce make-tiny: --vae-steps must be in [0, --pretrain-steps), got {vae_steps}"
    line = one_line_error(capsys, cli.main(["make-tiny", str(tmp_path / "m"), "--vae-steps", "3"]))
    assert line == ("texforce make-tiny: --vae-steps 3 needs --pretrain-steps: the VAE's steps are the first of the "
                    "pretraining's (without it the model is left random); pass --pretrain-steps N above it")
    assert not (tmp_path / "m").exists()


def test_make_tiny_passes_its_options_and_says_what_it_wrote(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("toyworld.tiny.make_tiny", lambda directory, **kw: calls.append(kw) or directory)
    out = tmp_path / "m"
    assert cli.main(["make-tiny", str(out), "--pretrain-steps", "9", "--vae-steps", "2", "--scenes", "train"]) == 0
    assert calls == [{"seed": 0, "pretrain_steps": 9, "vae_steps": 2, "scenes": "train", "progress": True}]
    assert capsys.readouterr().out == f"tiny Stable Diffusion pipeline (pretrained (9 steps)) written to {out}\n"


def test_missing_config_file(capsys, tmp_path):
    assert cli.main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_resume_rejects_a_second_config(capsys, tmp_path):
    assert cli.main(["train", "--resume", str(tmp_path), "--config", "x.yaml"]) == 2
    assert "--resume uses the run's own config.yaml" in capsys.readouterr().err


def test_python_m_rl_train_is_the_same_entry():
    out = subprocess.run([sys.executable, "-m", "rl.train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--resume RUN_DIR" in out.stdout and "section.key=value" in out.stdout


RAY_RUN = ("resources.mode=ray", "resources.num_samplers=1", "resources.cpus_per_sampler=0.5",
           "resources.cpus_per_reward_actor=0.25", "resources.cpus_per_learner=0.75")


@pytest.mark.parametrize("sig, mode, code, word", [(signal.SIGINT, (), 130, "interrupted"),
                                                   (signal.SIGTERM, (), 143, "stopped"),
                                                   (signal.SIGTERM, RAY_RUN, (1, 15), "stopped")],
                         ids=["ctrl-c", "sigterm", "sigterm-ray"])
def test_ctrl_c_or_sigterm_stops_without_a_traceback_and_the_run_resumes_from_what_it_kept(
        tiny_sd_dir, tmp_path, sig, mode, code, word):
    """SIGINT mid-run (as Ctrl-C sends it) or SIGTERM (kill, `ray job stop`): no traceback, a warning naming the
    kept checkpoint and the resume command, exit code 128 + the signal (Ctrl-C also one line saying so; on Ray, 1,
    what Ray's handler gives a driver it stops inside a Ray call, else 15, and no native stack dump); resuming
    finishes the run."""
    command = [sys.executable, "-m", "rl.train", *tiny_args(tiny_sd_dir, tmp_path, "num_epochs=1000", *mode)[1:]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the session's
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run = RunDirectory(tmp_path / "r")
    try:
        while run.latest_checkpoint() is None:  # epoch 0 is checkpointed: the loop is running
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode in (code if mode else (code,)), stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr
    latest = run.latest_checkpoint()
    warning = f"{word}; the last checkpoint, {latest.name}, is kept: continue with `texforce train --resume {run.path}`"
    lines = stderr.strip().splitlines()
    assert warning in lines[-1 if sig == signal.SIGTERM else -2]
    assert sig == signal.SIGTERM or lines[-1] == "texforce train: interrupted"
    done = run.checkpointed_epochs()
    epochs = [row["epoch"] for row in run.read_metrics()]  # every checkpointed epoch's row (and maybe the next's)
    assert epochs[:done] == list(range(done)) and len(epochs) in (done, done + 1)
    # inline: a Ray run resumes in this process too, without a Ray here
    assert cli.main(["train", "--resume", str(run.path), f"num_epochs={done + 1}", "resources.mode=inline"]) == 0
    assert [row["epoch"] for row in run.read_metrics()][-2:] == [done - 1, done]
    assert (run.final_lora / "pytorch_lora_weights.safetensors").is_file()


def _locked(directory: Path) -> int:
    """A descriptor holding the lock another texforce command would hold on `directory` (rl.output_lock)."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_command_pointed_at_a_directory_another_one_writes_is_refused_and_lets_it_go_when_done(
        tiny_sd_dir, tmp_path, capsys):
    """Two runs with one run_name, or two evals with one --out, wrote into one folder, each saying it wrote its
    outputs there (the second run was refused only once the first had finished an epoch)."""
    run_dir, eval_dir = tmp_path / "r", tmp_path / "eval"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    evaluate = ["eval", "--model", tiny_sd_dir, "--prompts", str(prompts), "--reward", "brightness", "--device", "cpu",
                "--steps", "2", "--seeds", "1", "--out", str(eval_dir)]
    for directory, argv, option in ((run_dir, tiny_args(tiny_sd_dir, tmp_path), "output_dir/run_name"),
                                    (eval_dir, evaluate, "--out")):
        other = _locked(directory)  # another command is writing there
        line = one_line_error(capsys, cli.main(argv))
        assert line.endswith(f"{option}: {directory} is in use by another texforce command, which writes its "
                             "outputs there; wait for it to end, or choose another directory"), line
        assert list(directory.iterdir()) == []
        os.close(other)  # it ended
        assert cli.main(argv) == 0
        capsys.readouterr()
        os.close(_locked(directory))  # and this one let it go
    assert (run_dir / "metrics.parquet").exists() and (eval_dir / "scores.parquet").exists()


def test_resume_refuses_fewer_epochs_than_the_run_has_finished(tiny_sd_dir, tmp_path, capsys, caplog):
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(tiny_args(tiny_sd_dir, tmp_path, "num_epochs=2")) == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's SIGTERM handler does not outlive it
    capsys.readouterr()
    run = RunDirectory(tmp_path / "r")
    config_text = run.config_path.read_text()
    line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), "num_epochs=1"]))
    assert line == (f"texforce train: --resume {run.path} has finished 2 epochs (its last checkpoint is epoch_0001); "
                    "num_epochs=1 would end before that: pass num_epochs=2 or more")
    assert run.config_path.read_text() == config_text  # the refused override is not saved
    with caplog.at_level("INFO", logger="texforce"):
        assert cli.main(["train", "--resume", str(run.path)]) == 0
    assert "the run has finished its num_epochs=2; pass num_epochs=N with --resume to train more" in caplog.text
    assert [row["epoch"] for row in run.read_metrics()] == [0, 1]


def test_resume_refuses_overrides_the_checkpoints_lora_was_not_trained_with(tiny_sd_dir, tmp_path, capsys):
    assert cli.main(tiny_args(tiny_sd_dir, tmp_path)) == 0  # lora.rank 16, text-encoder LoRA, PPO (the defaults)
    capsys.readouterr()
    run = RunDirectory(tmp_path / "r")
    config_text = run.config_path.read_text()
    for override, was in [("lora.rank=4", "16"), ("lora.policy=unet", "'text_encoder'"),
                          ("train.algorithm=refl", "'ppo'"), ("lora.text_encoder_targets=[q_proj]", "['q_proj', "),
                          ("lora.alpha=4", "16.0"), ("lora.unet_targets=[to_q]", "['to_q', ")]:
        line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), "num_epochs=2", override]))
        key = override.split("=")[0]
        assert line.startswith(f"texforce train: --resume {run.path}: {key} cannot change in a resume (its "
                               f"checkpoints' LoRA was trained with {key}={was}"), line  # not a traceback
    assert run.config_path.read_text() == config_text  # nothing refused was saved
    # a resume goes on in the folder it is given: another run_name or output_dir would leave the run there and its
    # config.yaml saying it is elsewhere
    for override in ("run_name=elsewhere", f"output_dir={tmp_path / 'other'}"):
        line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), "num_epochs=2", override]))
        key = override.split("=")[0]
        assert line.startswith(f"texforce train: --resume {run.path}: {key} cannot change in a resume"), line
    assert run.config_path.read_text() == config_text and not (tmp_path / "other").exists()


def test_a_resume_from_another_directory_names_the_relative_path_it_cannot_find(tiny_sd_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """A run's config.yaml keeps its paths as given; a resume from another directory said only `prompt file not found:
    prompts.txt`, which the user had not typed in that command."""
    from rl.config import load_config

    start, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for directory in (start, elsewhere):
        directory.mkdir()
    (start / "prompts.txt").write_text("a red ball\n")
    monkeypatch.chdir(start)
    run = RunDirectory(start / "runs" / "r")
    run.path.mkdir(parents=True)
    run.save_config(load_config(None, tiny_args(tiny_sd_dir, start / "runs")[1:] + ["prompts.file=prompts.txt"]))
    train.check_relative_paths_found(load_config(run.config_path), run.path)  # from where it started: found
    monkeypatch.chdir(elsewhere)
    line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), "num_epochs=2"]))
    assert line == (f"texforce train: --resume {run.path}: prompts.file=prompts.txt (its config.yaml's) is a relative "
                    f"path, not found from {elsewhere}; resume from the directory the run started in, or pass "
                    "prompts.file=ABSOLUTE_PATH")
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml"]  # nothing started


def test_resume_without_a_checkpoint_to_go_on_from_keeps_the_runs_metrics(tiny_sd_dir, tmp_path, capsys, caplog):
    """A resume that found no checkpoint trained again from epoch 0 and overwrote the run's metrics, final LoRA and
    damaged checkpoint: where the run has progress and nothing to go on from, it is refused."""
    assert cli.main(tiny_args(tiny_sd_dir, tmp_path, "keep_checkpoints=1")) == 0
    capsys.readouterr()
    run = RunDirectory(tmp_path / "r")
    (only,) = run.complete_checkpoints()
    learner = only / "learner.pt"
    learner.write_bytes(learner.read_bytes()[: learner.stat().st_size // 2])  # damaged
    metrics, lora = run.metrics_path.read_bytes(), (run.final_lora / "pytorch_lora_weights.safetensors").read_bytes()
    code = cli.main(["train", "--resume", str(run.path), "num_epochs=2"])
    assert code == 2 and "epoch_0000 cannot be read" in caplog.text
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"texforce train: --resume {run.path}: none of its checkpoints reads back (the warnings above name them), and "
        "a resume from epoch 0 would overwrite its metrics; start a new run (another run_name)")
    assert run.metrics_path.read_bytes() == metrics and learner.is_file()
    assert (run.final_lora / "pytorch_lora_weights.safetensors").read_bytes() == lora
    shutil.rmtree(run.checkpoints)  # no checkpoint at all: refused before any work
    line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), "num_epochs=2"]))
    assert line == (f"texforce train: --resume {run.path} has metrics but no complete checkpoint to go on from, and a "
                    "resume from epoch 0 would overwrite them; start a new run (another run_name)")
    assert run.metrics_path.read_bytes() == metrics


# Each command's work (the driver's actors, sampling, scoring, the sweep, the pretraining), stubbed to fail:
# an output that cannot be written must stop the command before it.
WORK = ("actors.driver.make_workers", "tune.worker.evaluate_alphas", "rewards.registry.build_reward",
        "tune.sweep.run_sweep", "toyworld.tiny.make_tiny")


@pytest.mark.parametrize("command", ["train", "eval", "score", "fuse", "tune", "make-tiny"])
def test_an_output_that_cannot_be_written_fails_before_any_work(command, tiny_sd_dir, tmp_path, capsys, monkeypatch):
    from lora_fixtures import make_lora
    from PIL import Image

    for target in WORK:
        monkeypatch.setattr(target, lambda *a, _target=target, **k: pytest.fail(f"{_target} ran before the check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # under a regular file: no directory can be made there, whoever runs the test
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "0.png")
    loras = [item for seed in (1, 2) for item in
             ("--lora", str(make_lora(tiny_sd_dir, tmp_path / f"lora{seed}", rank=2, alpha=2, seed=seed)))]
    argv, option, path = {
        "train": (tiny_args(tiny_sd_dir, out), "output_dir", out / "r"),
        "eval": (["eval", "--model", tiny_sd_dir, "--prompts", str(prompts), "--reward", "brightness", "--out",
                  str(out)], "--out", out),
        "score": (["score", "--reward", "brightness", "--images", str(tmp_path / "images"), "--prompts", str(prompts),
                   "--out", str(out / "s.parquet")], "--out", out),
        "fuse": (["fuse", *loras, "--out", str(out / "f.safetensors")], "--out", out),
        "tune": (["tune", "--model", tiny_sd_dir, "--prompts", str(prompts), *loras, "--objective", "brightness",
                  "--out", str(out)], "--out", out),
        "make-tiny": (["make-tiny", str(out)], "directory", out),
    }[command]
    line = one_line_error(capsys, cli.main(argv))
    assert line == (f"texforce {command}: {option}: cannot write to {path} (Not a directory); choose a directory "
                    "this user can write to")
    assert blocker.is_file() and blocker.read_text() == ""


@pytest.mark.parametrize("command", ["eval", "score"])
def test_a_disk_that_fills_up_while_writing_is_one_line_after_the_results_are_shown(
        command, tiny_sd_dir, tmp_path, capsys, monkeypatch):
    import errno

    import pyarrow.parquet as pq
    from PIL import Image

    def disk_full(*args, **kwargs):  # as pyarrow raises it: an errno, no file name
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "images" / "0.png")
    argv = {
        "eval": ["eval", "--model", tiny_sd_dir, "--prompts", str(prompts), "--reward", "brightness", "--device", "cpu",
                 "--steps", "2", "--seeds", "2", "--out", str(tmp_path / "out")],
        "score": ["score", "--reward", "brightness", "--images", str(tmp_path / "images"), "--prompts", str(prompts),
                  "--out", str(tmp_path / "out" / "s.parquet")],
    }[command]
    monkeypatch.setattr(pq, "write_table", disk_full)
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1] == (  # after the progress bar
        f"texforce {command}: No space left on device: the command's outputs; free space there, then run the command "
        "again")
    shown = {"eval": r"brightness: 0\.\d{4} \+- 0\.\d{4} \(std 0\.\d{4}, n 2\)",
             "score": r"^scored 1 images with brightness:1: mean 1\.0000$"}[command]
    assert re.search(shown, captured.out, re.MULTILINE), captured.out  # the scores computed before the disk filled up
    assert "wrote" not in captured.out


def test_a_read_only_disk_says_so_and_names_the_file(monkeypatch, capsys):
    import argparse
    import errno

    def read_only(args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/out.safetensors")

    code = cli.run_command(argparse.Namespace(command="fuse", func=read_only))
    assert code == 1
    assert capsys.readouterr().err.strip() == ("texforce fuse: Read-only file system: /mnt/ro/out.safetensors; make it "
                                               "writable or write elsewhere, then run the command again")


def test_other_os_errors_are_still_bugs():
    import argparse
    import errno

    def bug(args):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    with pytest.raises(OSError):
        cli.run_command(argparse.Namespace(command="eval", func=bug))


def test_make_tiny_does_not_overwrite_a_model(tiny_sd_dir, capsys, monkeypatch):
    monkeypatch.setattr("toyworld.tiny.make_tiny", lambda *a, **k: pytest.fail("built over an existing model"))
    line = one_line_error(capsys, cli.main(["make-tiny", tiny_sd_dir]))
    assert line == (f"texforce make-tiny: {tiny_sd_dir} holds a diffusers model already; remove it or choose "
                    "another directory")


def test_make_output_dir_makes_the_parents_and_returns_the_directory(tmp_path):
    from rl.run_dir import make_output_dir

    assert make_output_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []  # no scratch file left
    assert make_output_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"  # an existing directory is fine


def test_make_output_dir_refuses_an_existing_directory_where_no_file_can_be_made():
    """The directory exists, so making it finds nothing wrong: only writing a file in it finds out. procfs takes no
    new file from anyone (a mode-0555 directory would not stop root, as CI runs)."""
    from rl.config import ConfigError
    from rl.run_dir import make_output_dir

    if not Path("/proc/self").is_dir():
        pytest.skip("no procfs on this machine")
    with pytest.raises(ConfigError, match=re.escape("--out: cannot write to /proc/self (")):
        make_output_dir("/proc/self", "--out")


def test_existing_run_directory_is_not_overwritten(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    from rl.config import load_config
    from rl.run_dir import RunDirectory

    config = load_config(None, [f"output_dir={tmp_path}", "run_name=r"])
    RunDirectory.create(config).append_metrics({"epoch": 0, "reward_mean": 0.5})  # a run with progress
    with pytest.raises(FileExistsError, match="--resume"):
        RunDirectory.create(config)
    monkeypatch.setattr("actors.driver.train", lambda *a, **k: pytest.fail("refused only after the preflight"))
    line = one_line_error(capsys, cli.main(tiny_args(tiny_sd_dir, tmp_path)))
    assert line == (f"texforce train: run directory {tmp_path / 'r'} already holds a run; continue it with "
                    f"`--resume {tmp_path / 'r'}` or choose another run_name=...")


def test_print_config_prints_the_runs_settings_and_starts_nothing(capsys, tmp_path):
    """`--print-config` shows what a run would use, for a new run and for the run `--resume` continues, and
    leaves the output directory as it was (a taken run_name is no error: nothing starts)."""
    from rl.config import load_config

    args = ["--config", TINY_YAML, f"output_dir={tmp_path}", "train.learning_rate=1e-3"]
    assert cli.main(["train", *args, "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config(TINY_YAML, args[2:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]  # no run directory

    run = RunDirectory.create(load_config(printed))
    assert cli.main(["train", *args, "--print-config"]) == 0  # its run_name is taken now
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run.path), "num_epochs=30", "--print-config"]) == 0
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(capsys.readouterr().out)
    assert load_config(resumed) == load_config(printed, ["num_epochs=30"])
    assert one_line_error(capsys, cli.main(["train", *args, "train.lerning_rate=1", "--print-config"])).startswith(
        "texforce train: unknown config key 'train.lerning_rate'")


def test_a_bad_command_line_is_one_line_and_overrides_may_follow_options(capsys):
    """argparse printed its usage before the error (2-8 lines), and read `section.key=value` overrides only up to the
    first option after them."""
    for argv, line in [
        ([], "texforce: the following arguments are required: COMMAND (see texforce --help)"),
        (["eval", "--model", "m", "--prompts", "p", "--reward", "r", "--seeds", "two"],
         "texforce eval: argument --seeds: invalid int value: 'two' (see texforce eval --help)"),
        # said by the subcommand, whose --help lists its options (it was `texforce: ... (see texforce --help)`)
        (["train", "--bogus"], "texforce train: unrecognized arguments: --bogus (see texforce train --help)"),
        (["fuse", "--lora", "a", "--out", "b", "--alpha", "1"],
         "texforce fuse: unrecognized arguments: --alpha 1 (see texforce fuse --help)"),
        (["rewards"], "texforce rewards: the following arguments are required: {list} (see texforce rewards --help)"),
    ]:
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2 and capsys.readouterr().err == line + "\n"
    assert cli.main(["train", "seed=1", "--config", TINY_YAML, "num_epochs=2", "--print-config", "seed=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["seed"], printed["num_epochs"]) == (3, 2)  # all three, the later seed winning
    with pytest.raises(SystemExit):
        train.main(["--config", TINY_YAML, "--bogus"])
    assert capsys.readouterr().err == ("python -m rl.train: unrecognized arguments: --bogus "
                                       "(see python -m rl.train --help)\n")


def test_help_states_each_options_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = {part.split()[0]: part for part in ("--" + p for p in text.split(" --")[1:])}
    assert options["--num-samples"] == "--num-samples NUM_SAMPLES trials (random / Optuna search) (default: 16)"
    assert options["--dtype"].endswith("dtype the pipeline is loaded in (default: float32)")
    assert options["--seeds"].endswith("(default: 2)") and options["--steps"].endswith("DDIM steps (default: 50)")
    assert options["--ray-address"].count("default") == 1  # its help says it already
    assert "default" not in options["--grid"] and "default" not in options["--normalize"]  # None, a flag
    assert "default" not in options["--paths"]  # an empty list


# --- one representative user error per category, through the real entry ----------------------


def test_config_syntax_error_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  num_steps: 10\n  eta: [1\n")
    line = one_line_error(capsys, cli.main(["train", "--config", str(bad)]))
    assert line.startswith(f"texforce train: {bad}:4: invalid YAML:")


def test_bad_value_names_the_key_and_the_rule(capsys):
    line = one_line_error(capsys, cli.main(["train", "--config", TINY_YAML, "sample.eta=1.5"]))
    assert line.startswith("texforce train: sample.eta must be in (0, 1], got 1.5")


def test_failed_train_leaves_no_run_directory_and_the_same_command_fails_the_same_way(capsys, tmp_path):
    args = ["train", "--config", TINY_YAML, f"output_dir={tmp_path}", "model.pretrained=/nonexistent/sd",
            "resources.mode=inline"]
    first = one_line_error(capsys, cli.main(args))
    assert "model directory not found: /nonexistent/sd" in first and "make-tiny" in first
    assert list(tmp_path.iterdir()) == []
    assert one_line_error(capsys, cli.main(args)) == first  # not "already holds a run"


def test_truncated_model_file_is_named(capsys, tiny_sd_dir, tmp_path):
    import shutil

    model = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    line = one_line_error(capsys, cli.main(tiny_args(model, tmp_path / "runs")))
    assert f"{weights} is truncated" in line and "download or copy it again" in line
    assert not (tmp_path / "runs").exists()


def test_missing_prompt_file(capsys, tiny_sd_dir, tmp_path):
    line = one_line_error(capsys, cli.main(tiny_args(tiny_sd_dir, tmp_path, f"prompts.file={tmp_path / 'p.txt'}")))
    assert f"prompt file not found: {tmp_path / 'p.txt'} (prompts.file" in line
    assert not (tmp_path / "r").exists()


def test_missing_reward_file_names_the_config_key(capsys, tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TEXFORCE_AESTHETIC", raising=False)
    line = one_line_error(capsys, cli.main(tiny_args(tiny_sd_dir, tmp_path, "reward.spec=aesthetic")))
    assert "reward 'aesthetic': no path given for 'aesthetic'" in line
    assert "reward.paths.aesthetic=PATH" in line and "paths={" not in line
    assert not (tmp_path / "r").exists()


def test_lora_target_that_is_not_a_linear_layer(capsys, tiny_sd_dir, tmp_path):
    line = one_line_error(capsys, cli.main(tiny_args(tiny_sd_dir, tmp_path, "lora.text_encoder_targets=[token_embedding]")))
    assert line.startswith("texforce train: lora.text_encoder_targets: 'token_embedding' matches ")
    assert "embeddings.token_embedding (Embedding); a LoRA here trains and is saved on Linear and Conv2d layers only" in line
    assert "q_proj" in line
    assert not (tmp_path / "r").exists()


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    line = one_line_error(capsys, cli.main(["train", "--resume", str(tmp_path)]))
    assert line == (f"texforce train: --resume {tmp_path} is not a run directory (no config.yaml); pass the "
                    "output_dir/run_name folder that `texforce train` created")


def test_resume_checks_the_run_config_with_its_overrides(capsys, tiny_sd_dir, tmp_path):
    from rl.config import load_config
    from rl.run_dir import RunDirectory

    run = RunDirectory.create(load_config(None, tiny_args(tiny_sd_dir, tmp_path)[1:]))
    line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), "reward.spec=nope"]))
    assert line.startswith("texforce train: unknown reward 'nope'; valid rewards:")
    line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), "sample.eta=2"]))
    assert line.startswith("texforce train: sample.eta must be in (0, 1], got 2.0")


def test_resume_refuses_overrides_that_unpair_the_held_out_gains(capsys, tiny_sd_dir, tmp_path):
    from rl.config import load_config

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\n")
    args = tiny_args(tiny_sd_dir, tmp_path, f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=2")
    run = RunDirectory.create(load_config(None, args[1:]))
    for override, key, was in [("evaluation.num_seeds=8", "evaluation.num_seeds", "2"),
                               ("sample.guidance_scale=7.5", "sample.guidance_scale", "5.0"),
                               ("evaluation.reward=brightness", "evaluation.reward", "None"),
                               ("sample.eta=0.5", "sample.eta", "1.0"),  # evaluation.eta's default
                               ("sample.num_steps=5", "sample.num_steps", "4"),
                               ("evaluation.seed_base=7", "evaluation.seed_base", "2147483648"),
                               ("sample.negative_prompt=blurry", "sample.negative_prompt", "''"),
                               ("sample.height=32", "sample.height", "None"), ("sample.width=32", "sample.width", "None"),
                               ("evaluation.eta=0.5", "evaluation.eta", "None")]:
        line = one_line_error(capsys, cli.main(["train", "--resume", str(run.path), override]))
        assert line.startswith(f"texforce train: --resume {run.path}: {key} cannot change in a resume (the held-out "
                               f"gains are paired with the base model's images and scores at {key}={was}, not "), line
    # what the evaluations do not depend on may change: how often they run, the training's step size
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    config = train.load_run_config(parser.parse_args(["--resume", str(run.path), "evaluation.every=1",
                                                      "train.learning_rate=1e-4"]))
    assert (config.evaluation.every, config.train.learning_rate) == (1, 1e-4)
    # a run judged on its own evaluation reward and eta may change the ones it trains with
    judged = RunDirectory.create(load_config(None, [*args[1:], "run_name=judged", "evaluation.reward=brightness",
                                                    "evaluation.eta=0"]))
    config = train.load_run_config(parser.parse_args(["--resume", str(judged.path), "reward.spec=brightness",
                                                      "sample.eta=0.5"]))
    assert (config.reward.spec, config.sample.eta) == ("brightness", 0.5)
    # a run without held-out prompts may get them in a resume, with settings of its own
    plain = RunDirectory.create(load_config(None, tiny_args(tiny_sd_dir, tmp_path, "run_name=plain")[1:]))
    config = train.load_run_config(parser.parse_args(["--resume", str(plain.path), f"evaluation.prompts_file={held_out}",
                                                      "evaluation.num_seeds=8"]))
    assert (config.evaluation.prompts_file, config.evaluation.num_seeds) == (str(held_out), 8)


def test_insufficient_resources_is_one_line_from_both_entries(capsys, tiny_sd_dir, tmp_path, monkeypatch):
    from actors.topology import InsufficientResourcesError

    def no_room(config, *, resume=None):
        raise InsufficientResourcesError("the cluster cannot host 2 samplers: GPU: requested 2, the cluster has 0")

    monkeypatch.setattr("actors.driver.train", no_room)
    line = one_line_error(capsys, cli.main(tiny_args(tiny_sd_dir, tmp_path)))
    assert line == "texforce train: the cluster cannot host 2 samplers: GPU: requested 2, the cluster has 0"
    assert one_line_error(capsys, train.main(tiny_args(tiny_sd_dir, tmp_path)[1:])) == line


def test_a_bug_still_raises(tiny_sd_dir, tmp_path, monkeypatch):
    def bug(config, *, resume=None):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr("actors.driver.train", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(tiny_args(tiny_sd_dir, tmp_path))


def test_user_error_types_are_listed_once_for_every_entry():
    import actors.topology
    import rewards
    import rl.models
    import rl.prompts
    import rl.run_dir
    import tune.lora_io
    from rl.config import ConfigError

    assert set(cli.loaded_types(cli.USER_ERRORS)) == {
        ConfigError, rl.models.ModelNotFoundError, rl.prompts.PromptsError, rewards.RewardError,
        tune.lora_io.LoraFormatError, actors.topology.InsufficientResourcesError, rl.run_dir.RunExistsError,
    }


def test_a_run_that_stops_prints_one_line_and_exits_1(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    from actors.driver import TrainingStopped

    def stops(config, *, resume=None):
        raise TrainingStopped("the learner failed 4 times\n...; resume with `texforce train --resume runs/x`")

    monkeypatch.setattr("actors.driver.train", stops)
    assert cli.main(tiny_args(tiny_sd_dir, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--resume runs/x" in err


# --- gradient learners: bad input is one line, before any work ---------------------------------


def test_unknown_algorithm_names_the_valid_ones(capsys, tmp_path):
    line = one_line_error(capsys, cli.main(["train", "--config", TINY_YAML, f"output_dir={tmp_path}",
                                            "train.algorithm=sgd"]))
    assert "train.algorithm: unknown algorithm 'sgd'; valid algorithms: ppo, draft, draft_k, draft_lv, refl, " \
           "alignprop, textcraftor" in line
    assert not (tmp_path / "tiny").exists()


def test_truncation_longer_than_the_trajectory_is_a_config_error(capsys, tmp_path):
    line = one_line_error(capsys, cli.main(["train", "--config", TINY_YAML, f"output_dir={tmp_path}",
                                            "train.algorithm=draft_k", "gradient.truncation_k=11"]))
    assert "gradient.truncation_k must be in [1, sample.num_steps=10], got 11" in line


def test_non_differentiable_reward_with_a_gradient_learner_names_the_differentiable_ones(capsys, tiny_sd_dir, tmp_path):
    line = one_line_error(capsys, cli.main(tiny_args(tiny_sd_dir, tmp_path, "train.algorithm=refl",
                                                     "reward.spec=color_alignment:1,jpeg_compressibility:0.1")))
    assert "train.algorithm=refl backpropagates the reward, but jpeg_compressibility is not differentiable; use a " \
           "differentiable reward (" in line
    assert "color_alignment" in line.split("differentiable reward (")[1] and "face_quality" not in line
    assert not (tmp_path / "r").exists()


def test_textcraftor_needs_a_text_encoder_lora(capsys, tmp_path):
    line = one_line_error(capsys, cli.main(["train", "--config", TINY_YAML, f"output_dir={tmp_path}",
                                            "train.algorithm=textcraftor", "lora.policy=unet"]))
    assert "lora.policy must be text_encoder or both with train.algorithm=textcraftor, got 'unet'" in line


def test_a_gradient_run_prints_its_held_out_gain(capsys, tiny_sd_dir, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\n")
    assert cli.main(tiny_args(tiny_sd_dir, tmp_path, "train.algorithm=refl", "lora.policy=unet",
                              f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=2",
                              "evaluation.reward=brightness")) == 0
    out = capsys.readouterr().out
    assert "held-out brightness (2 images): before training" in out  # evaluation.reward, not the trained reward
    scored = RunDirectory(tmp_path / "r").read_evaluations()
    assert all("reward_brightness_mean" in row and "reward_color_alignment_mean" not in row for row in scored)
    assert "held-out gain, paired over the same prompts and seeds" in out
