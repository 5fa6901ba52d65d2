"""The Prefect flow on a real (test-harness) Prefect API, and `dvc repro` in a temporary git repo.

One smoke pipeline run is shared by the module (``smoke_repo``); the tests after it use that workspace
in file order: artifacts → push / fresh clone / pull → a missing input → a failed run → Ctrl-C →
two pipelines at once. The `drivevla pipeline` command runs as a subprocess against the harness API
(``cli_env``); the last test runs it as a new user would, on a fresh HOME and PREFECT_HOME.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tests.integration.helpers import ROOT, make_project_repo, sh, venv_env

STAGES = ["data", "pretrain", "offline", "online", "evaluate", "export"]


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def smoke_repo(prefect_api, tmp_path_factory) -> Path:
    """The project (git-ignoring metrics/ and plots/ as the real one does) after one smoke run."""
    from flows.pipeline import pipeline

    repo = make_project_repo(tmp_path_factory.mktemp("flow") / "repo")
    shutil.copy2(ROOT / ".gitignore", repo / ".gitignore")
    sh(["git", "commit", "-qam", "the project's .gitignore"], repo)
    results = pipeline(workdir=str(repo))
    assert list(results) == STAGES
    return repo


def cli_env(repo: Path, **extra: str) -> dict[str, str]:
    """`drivevla` in a subprocess: the repo copy's code, the harness's API."""
    from prefect.settings import PREFECT_API_URL

    return venv_env(PYTHONPATH=str(repo), PREFECT_API_URL=PREFECT_API_URL.value(),
                    PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)


def drivevla(repo: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows", *args], cwd=repo, env=cli_env(repo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def printed_results(output: str) -> dict:
    """The JSON `drivevla pipeline` prints at the end (each stage's metrics)."""
    output = "\n" + output  # alone on stdout (the logs go to stderr), it starts the output
    start = output.rindex("\n{\n") + 1
    return json.loads(output[start:output.index("\n}\n", start) + 2])


def dvc_status(repo: Path) -> dict:
    return json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], repo).stdout)


def test_flow_runs_all_stages_through_dvc(smoke_repo):
    repo = smoke_repo
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert any(o["path"] == "exports" for o in lock["stages"]["export"]["outs"])
    assert json.loads((repo / "metrics/export.json").read_text())["onnx_parity_passed"] is True
    assert dvc_status(repo) == {}, "DVC sees the workspace as out of date after the flow"


def test_stage_artifacts_show_metrics_tables_and_plot_images(smoke_repo):
    from prefect.artifacts import Artifact

    table = Artifact.get("stage-pretrain-metrics")
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    metrics = json.loads((smoke_repo / "metrics/pretrain.json").read_text())
    assert {r["metric"] for r in rows} == set(metrics)
    images = {key: Artifact.get(key) for key in ("stage-evaluate-evaluate-scores", "stage-evaluate-evaluate-strip",
                                                 "stage-offline-offline-open-loop")}
    for key, art in images.items():
        assert art is not None and art.type == "image", key
        assert art.data.startswith("data:image/png;base64,"), key
    assert Artifact.get("stage-export").type == "markdown"


def test_dvc_push_then_pull_in_a_fresh_clone_is_up_to_date(smoke_repo, tmp_path):
    """Metrics and plots are DVC-cached: a teammate's `dvc pull` brings every output back."""
    repo = smoke_repo
    sh([sys.executable, "-m", "dvc", "push"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "pipeline outputs"], repo)
    tracked = sh(["git", "ls-files"], repo).stdout.split()
    assert not [p for p in tracked if p.startswith(("metrics/", "plots/")) and not p.endswith(".gitignore")]
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    sh([sys.executable, "-m", "dvc", "pull"], clone)
    for path in ("metrics/evaluate.json", "metrics/pretrain_history.json", "plots/evaluate_scores.png",
                 "plots/offline_open_loop.png", "exports/policy.onnx"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert dvc_status(clone) == {}


def test_missing_input_fails_before_dvc_deletes_outputs(smoke_repo, tmp_path):
    from flows.pipeline import pipeline
    from tasks.dvc_project import MissingStageInput

    repo = smoke_repo
    kept = {p: (repo / p).read_bytes() for p in ("metrics/pretrain.json", "metrics/pretrain_history.json")}
    ckpt = sorted(p.relative_to(repo) for p in (repo / "checkpoints/pretrain").rglob("*") if p.is_file())
    shutil.move(repo / "data/train", tmp_path / "train")
    try:
        with pytest.raises(MissingStageInput) as info:
            pipeline(workdir=str(repo), stages=["pretrain"])
        message = str(info.value)
        assert "data/train" in message and "drivevla pipeline --stage data" in message and "dvc pull" in message
        assert {p: (repo / p).read_bytes() for p in kept} == kept
        assert sorted(p.relative_to(repo) for p in (repo / "checkpoints/pretrain").rglob("*") if p.is_file()) == ckpt
    finally:
        shutil.move(tmp_path / "train", repo / "data/train")
    assert dvc_status(repo) == {}


def test_failed_run_leaves_params_yaml_as_it_was(smoke_repo):
    """`--set env.backend=carla` without a Docker engine: the run fails, its overrides do not linger."""
    repo = smoke_repo
    before = (repo / "params.yaml").read_bytes()
    proc = drivevla(repo, "pipeline", "--stage", "online", "--set", "env.backend=carla")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-3000:]
    assert (repo / "params.yaml").read_bytes() == before
    assert dvc_status(repo) == {}, "stages look changed after a failed run"


def run_of(repo: Path) -> list[psutil.Process]:
    """Every process working in ``repo`` (the pipeline, dvc, a stage)."""
    found = []
    for p in psutil.process_iter(["cwd", "cmdline"]):
        try:
            if p.info["cwd"] and Path(p.info["cwd"]) == repo and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_ctrl_c_stops_the_running_stage(smoke_repo):
    """SIGINT to the pipeline's process group while `python -m stages.online` runs: nothing survives."""
    repo = smoke_repo
    before = (repo / "params.yaml").read_bytes()
    proc = drivevla(repo, "pipeline", "--set", "online.total_timesteps=4096", start_new_session=True)
    stage: list[psutil.Process] = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None and not stage:
            stage = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "stages.online" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert stage, "the online stage never started"
        time.sleep(2)  # let it get into training
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    survivors = [p for p in stage if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] + run_of(repo)
    assert not survivors, f"processes outlived the run: {[p.cmdline() for p in survivors]}\n{out[-2000:]}"
    assert (repo / "params.yaml").read_bytes() == before


def test_two_pipelines_on_one_workspace_each_train_with_their_own_params(smoke_repo):
    repo = smoke_repo
    runs = {steps: drivevla(repo, "pipeline", "--set", f"online.total_timesteps={steps}") for steps in (128, 160)}
    outputs = {steps: p.communicate(timeout=900)[0] for steps, p in runs.items()}
    for steps, p in runs.items():
        assert p.returncode == 0, outputs[steps][-3000:]
        assert printed_results(outputs[steps])["online"]["timesteps"] == steps, "a run trained another's params"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    last = lock["online"]["params"]["params.yaml"]["online"]["total_timesteps"]
    summary = json.loads((repo / "runs/pipeline/summary.json").read_text())
    assert summary["lineage"]["params"]["online"]["total_timesteps"] == last
    assert json.loads((repo / "metrics/online.json").read_text())["timesteps"] == last
    assert dvc_status(repo) == {}


def test_dvc_repro_alone(tmp_path):
    repo = make_project_repo(tmp_path / "repo")
    sh([sys.executable, "-m", "dvc", "repro"], repo)
    assert (repo / "exports/policy.onnx").exists()
    again = sh([sys.executable, "-m", "dvc", "repro"], repo)
    assert "didn't change, skipping" in again.stdout + again.stderr


def test_flow_rejects_bad_config_before_work(prefect_api, tmp_path):
    from flows.pipeline import pipeline
    from stages.config import ConfigError

    repo = make_project_repo(tmp_path / "repo")
    before = (repo / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="online.ppo.gamma"):
        pipeline(workdir=str(repo), overrides=["online.ppo.gamma=2"])
    assert (repo / "params.yaml").read_text() == before
    assert not (repo / "data").exists()


def test_flow_without_dvc_outside_a_repository(prefect_api, tmp_path):
    """`drivevla pipeline --no-dvc`: stages called directly, in a folder with no dvc.yaml or git."""
    from flows.pipeline import pipeline

    results = pipeline(workdir=str(tmp_path), preset="smoke", stages=["data"], use_dvc=False)
    assert results["data"]["episodes"] == 4
    assert (tmp_path / "data/sim/manifest.json").exists()
    assert not (tmp_path / "dvc.lock").exists()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_command_on_a_fresh_home_under_cpu_load(tmp_path):
    """`drivevla pipeline --preset smoke` (the console script) as a new user runs it: empty HOME and
    PREFECT_HOME, so the ephemeral Prefect API creates its database on this first start, while a
    busy loop loads the CPU."""
    repo = make_project_repo(tmp_path / "repo")
    home, prefect_home = tmp_path / "home", tmp_path / "prefect-home"
    home.mkdir()
    prefect_home.mkdir()
    env = venv_env(HOME=str(home), PREFECT_HOME=str(prefect_home), PYTHONPATH=str(repo))
    for key in [k for k in env if k.startswith("PREFECT_") and k != "PREFECT_HOME"]:
        del env[key]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "drivevla"), "pipeline", "--preset", "smoke"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=2300)
    finally:
        busy.kill()
        busy.wait()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(printed_results(proc.stdout)) == STAGES
    assert (repo / "exports/policy.onnx").exists() and (repo / "metrics/evaluate.json").exists()
    assert any(prefect_home.iterdir()), "the ephemeral API kept its database in the fresh PREFECT_HOME"
