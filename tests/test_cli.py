"""The command line: `texforce train` and `python -m rl.train` are one entry; bad input fails early."""
import subprocess
import sys
from pathlib import Path

from rl import cli, train

ROOT = Path(__file__).resolve().parents[1]


def test_bad_override_names_the_key(capsys):
    assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "train.lerning_rate=1"]) == 2
    assert "unknown config key 'train.lerning_rate'; did you mean 'learning_rate'" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "sample.num_steps=many"]) == 2
    assert "sample.num_steps: expected an int" in capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    assert cli.main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_resume_rejects_a_second_config(capsys, tmp_path):
    assert cli.main(["train", "--resume", str(tmp_path), "--config", "x.yaml"]) == 2
    assert "--resume uses the run's own config.yaml" in capsys.readouterr().err


def test_python_m_rl_train_is_the_same_entry():
    out = subprocess.run([sys.executable, "-m", "rl.train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--resume RUN_DIR" in out.stdout and "section.key=value" in out.stdout


def test_existing_run_directory_is_not_overwritten(tiny_sd_dir, tmp_path):
    from rl.config import load_config
    from rl.run_dir import RunDirectory

    config = load_config(None, [f"output_dir={tmp_path}", "run_name=r"])
    RunDirectory.create(config)
    try:
        RunDirectory.create(config)
    except FileExistsError as error:
        assert "--resume" in str(error)
    else:
        raise AssertionError("expected FileExistsError")
