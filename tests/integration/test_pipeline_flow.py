"""The Prefect flow on a real (test-harness) Prefect API, and `dvc repro` in a temporary git repo."""
import json
import sys

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from tests.integration.helpers import make_project_repo, sh


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_all_stages_through_dvc(prefect_api, tmp_path):
    from flows.pipeline import pipeline

    repo = make_project_repo(tmp_path / "repo")
    results = pipeline(workdir=str(repo))
    assert list(results) == ["data", "pretrain", "offline", "online", "evaluate", "export"]
    assert results["export"]["onnx_parity_passed"] is True
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"data", "pretrain", "offline", "online", "evaluate", "export"}
    assert any(o["path"] == "exports" for o in lock["stages"]["export"]["outs"])
    status = sh([sys.executable, "-m", "dvc", "status", "--json"], repo)
    assert json.loads(status.stdout) == {}, "DVC sees the workspace as out of date after the flow"


def test_flow_rejects_bad_config_before_work(prefect_api, tmp_path):
    from flows.pipeline import pipeline
    from stages.config import ConfigError

    repo = make_project_repo(tmp_path / "repo")
    before = (repo / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="online.ppo.gamma"):
        pipeline(workdir=str(repo), overrides=["online.ppo.gamma=2"])
    assert (repo / "params.yaml").read_text() == before
    assert not (repo / "data").exists()


def test_dvc_repro_alone(tmp_path):
    repo = make_project_repo(tmp_path / "repo")
    sh([sys.executable, "-m", "dvc", "repro"], repo)
    assert (repo / "exports/policy.onnx").exists()
    again = sh([sys.executable, "-m", "dvc", "repro"], repo)
    assert "didn't change, skipping" in again.stdout + again.stderr


def test_flow_without_dvc_outside_a_repository(prefect_api, tmp_path):
    """`drivevla pipeline --no-dvc`: stages called directly, in a folder with no dvc.yaml or git."""
    from flows.pipeline import pipeline

    results = pipeline(workdir=str(tmp_path), preset="smoke", stages=["data"], use_dvc=False)
    assert results["data"]["episodes"] == 4
    assert (tmp_path / "data/sim/manifest.json").exists()
    assert not (tmp_path / "dvc.lock").exists()
