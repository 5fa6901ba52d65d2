"""The `drivevla` command: help, config display, and bad input → a clear error and exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest
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


# ------------------------------------------------------------------ a params.yaml that is not a mapping

BAD_PARAMS = {
    "not_yaml": ("preset: smoke\nonline: {total_timesteps: [1\n", "not valid YAML at line"),
    "a_list": ("- preset\n- smoke\n", "expected a mapping of sections"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
@pytest.mark.parametrize("command", [["pipeline"], ["pipeline", "--stage", "pretrain"], ["stage", "pretrain"],
                                     ["config", "show"]])
def test_bad_params_file_exits_2_naming_the_file(tmp_path, monkeypatch, case, command):
    text, problem = BAD_PARAMS[case]
    (tmp_path / "params.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "params.yaml" in result.output and problem in result.output
    assert "Traceback" not in result.output and "dictionary update sequence" not in result.output
    assert (tmp_path / "params.yaml").read_text() == text, "the file is left as it was"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_file_stage_module_exits_2(tmp_path, case):
    text, problem = BAD_PARAMS[case]
    (tmp_path / "params.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "stages.pretrain"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "params.yaml" in proc.stderr and problem in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_flow_params_writer_rejects_bad_params_file(tmp_path, case):
    """The flow's own reader (it writes --set values into params.yaml) gives the same error."""
    from flows.pipeline import apply_params
    from stages.config import ConfigError

    text, problem = BAD_PARAMS[case]
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(ConfigError, match=problem) as info:
        apply_params(params, "smoke", ["online.total_timesteps=128"], required=["online"])
    assert str(params) in str(info.value)
    assert params.read_text() == text


def test_flow_params_writer_rejects_set_into_a_value(tmp_path):
    from flows.pipeline import apply_params
    from stages.config import ConfigError

    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\nonline: [1, 2]\n")
    with pytest.raises(ConfigError, match="`online` is a list, not a section"):
        apply_params(params, None, ["online.total_timesteps=128"])
    assert params.read_text() == "preset: smoke\nonline: [1, 2]\n"
