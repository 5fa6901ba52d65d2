"""The `drivevla` command: help, config display, and bad input → a clear error and exit code 2."""
import subprocess
import sys

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("pipeline", "stage", "config"):
        assert command in result.output


def test_config_show_merges_preset_and_overrides(tmp_path):
    result = runner.invoke(app, ["config", "show", "--params", str(tmp_path / "none.yaml"), "--preset", "smoke",
                                 "--set", "pretrain.epochs=7"])
    assert result.exit_code == 0, result.output
    assert "preset: smoke" in result.output
    assert "epochs: 7" in result.output


def test_bad_value_exits_2_naming_key(tmp_path):
    result = runner.invoke(app, ["config", "show", "--params", str(tmp_path / "none.yaml"),
                                 "--set", "online.ppo.gamma=1.5"])
    assert result.exit_code == 2
    assert "online.ppo.gamma" in result.output and "1.5" in result.output


def test_unknown_stage_exits_2():
    result = runner.invoke(app, ["stage", "deploy"])
    assert result.exit_code == 2
    assert "unknown stage" in result.output


def test_stage_module_main_rejects_bad_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.pretrain", "--params", str(tmp_path / "p.yaml"),
                           "--set", "pretrain.batch_size=1"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2]),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "pretrain.batch_size" in proc.stderr
