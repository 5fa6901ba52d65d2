"""The workspace lock of a pipeline run, params.yaml restored on failure, stopping a stage's whole
process group, and the one reader of dvc.yaml (missing inputs found before anything runs)."""
from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.dvc_project import MissingStageInput, check_deps, stage_names, stage_spec, tracked_params
from tasks.dvc_tasks import dvc_lock, run_streaming, workspace_run

DVC_YAML = """
stages:
  data:
    cmd: python -m stages.data
    deps: [stages/data]
    params: [preset, data]
    outs: [data/train]
    metrics:
      - metrics/data.json
  pretrain:
    cmd: python -m stages.pretrain
    deps: [data/train, stages/pretrain.py]
    params: [preset, pretrain, {other.yaml: [extra.key]}]
    outs: [checkpoints/pretrain]
    plots:
      - metrics/pretrain_history.json: {x: epoch, y: loss}
      - plots/pretrain.png
"""


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "stages/data").mkdir(parents=True)
    (tmp_path / "stages/pretrain.py").write_text("")
    (tmp_path / "params.yaml").write_text("preset: smoke\n")
    return tmp_path


def test_dvc_yaml_is_read_in_one_place(project):
    assert stage_names(project) == ["data", "pretrain"]
    spec = stage_spec(project, "pretrain")
    assert spec.deps == ("data/train", "stages/pretrain.py")
    assert spec.plots == ("metrics/pretrain_history.json", "plots/pretrain.png")
    assert stage_spec(project, "data").all_outs == ("data/train", "metrics/data.json")
    assert tracked_params(project) == ["preset", "data", "pretrain", "extra"]
    assert stage_spec(project / "nowhere", "data").deps == ()


def test_missing_dep_names_the_path_and_the_command_that_makes_it(project):
    with pytest.raises(MissingStageInput) as info:
        check_deps(project, ["pretrain"])
    message = str(info.value)
    assert "stage pretrain needs `data/train`" in message
    assert "drivevla pipeline --stage data" in message and "dvc pull data/train" in message
    check_deps(project, ["data", "pretrain"])  # the data stage of this run makes it
    (project / "data/train").mkdir(parents=True)
    check_deps(project, ["pretrain"])


def test_missing_code_dep_says_restore_it(project):
    (project / "stages/pretrain.py").unlink()
    with pytest.raises(MissingStageInput, match="stages/pretrain.py.*restore it"):
        check_deps(project, ["data", "pretrain"])


def test_failed_run_puts_params_back(project):
    params = project / "params.yaml"
    with pytest.raises(RuntimeError):
        with workspace_run(project):
            params.write_text("preset: smoke\nenv: {backend: carla}\n")
            raise RuntimeError("the carla stage failed")
    assert params.read_text() == "preset: smoke\n"
    with workspace_run(project):  # a run that succeeds keeps what it wrote
        params.write_text("preset: demo\n")
    assert params.read_text() == "preset: demo\n"


def test_interrupted_run_puts_params_back(project):
    params = project / "params.yaml"
    with pytest.raises(KeyboardInterrupt):
        with workspace_run(project):
            params.write_text("preset: carla\n")
            raise KeyboardInterrupt
    assert params.read_text() == "preset: smoke\n"


def test_run_holds_the_lock_its_dvc_calls_reenter_and_other_runs_wait(project):
    events: list[str] = []

    def other_run() -> None:
        with workspace_run(project):
            events.append("other run")

    with workspace_run(project):
        with dvc_lock(project, timeout_s=2):  # the run's own DVC call: no deadlock
            events.append("dvc call")
        # A task thread of the same run (Prefect copies the context into it) re-enters too.
        task = threading.Thread(target=contextvars.copy_context().run,
                                args=(lambda: dvc_lock(project, timeout_s=2).__enter__(),))
        task.start()
        task.join()
        other = threading.Thread(target=other_run)  # a second run: a new context, it must wait
        other.start()
        time.sleep(0.5)
        events.append("first run done")
    other.join(timeout=10)
    assert events == ["dvc call", "first run done", "other run"]


def test_interrupt_stops_the_stage_dvc_started(tmp_path):
    """A stage started by the command (here a grandchild, as dvc starts it) does not outlive the wait."""
    pid_file = tmp_path / "stage.pid"
    stage = tmp_path / "stage.py"
    stage.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    script = (f"import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, {str(stage)!r}])\n"
              f"print('started', flush=True)\n"
              f"time.sleep(600)\n")

    class InterruptOnFirstLine:
        def info(self, *args: object) -> None:
            for _ in range(1200):
                if pid_file.exists() and pid_file.read_text():
                    break
                time.sleep(0.05)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_streaming([sys.executable, "-c", script], tmp_path, logger=InterruptOnFirstLine())
    stage_pid = int(pid_file.read_text())
    time.sleep(0.2)
    assert not _alive(stage_pid), "the stage process outlived its run"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")
