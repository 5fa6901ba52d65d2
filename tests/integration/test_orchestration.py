"""Orchestration end to end, with real components: a Prefect test-harness API, a temporary git + DVC repo
holding the project, and a local S3 endpoint (moto server on a free port).

The smoke pipeline through DVC takes about a minute, so one repository is built once for the module and
the tests below use it in file order, each leaving it in a state the next one describes:
first run → no-change re-run → params change → push/pull through S3 → served deployments (pipeline run,
retrain schedule, retrain promoting a better and rejecting a worse candidate) → failure before the
pointer moves, then retry → rollback → hand-edited metrics refused → upload failing mid-promotion, then
retry → S3 unreachable / wrong credentials.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from infra.registry import (ModelStore, PromotionThresholds, assign_stage, collect_files, register_version,
                            registered_versions, stage_version)
from infra.s3 import S3AccessDenied, S3Settings, S3Unreachable, make_client
from tests.integration.helpers import ROOT, make_project_repo, sh
from tests.unit.test_registry import FAKE_KEYS, free_port, moto_auth_enforced, moto_s3

MODEL = "driving-policy"
MODEL_BUCKET = "drivevla-models"
SECTIONS = ("model", "env", "data", "pretrain", "offline", "online", "evaluate", "export", "promote")
SMOKE_PARAMS = {"preset": "smoke", "seed": 0, **{k: {} for k in SECTIONS}}
TIMINGS: dict[str, float] = {}


def dvc_s3_url() -> str:
    """The S3 remote's URL as the project's committed .dvc/config names it."""
    from configobj import ConfigObj

    return ConfigObj(str(ROOT / ".dvc" / "config"))['remote "s3"']["url"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """Moto S3 with the DVC and model buckets; the AWS environment points at it."""
    storage = tmp_path_factory.mktemp("prefect-results")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_KEYS.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("PREFECT_LOCAL_STORAGE_PATH", str(storage))
        with moto_s3(dvc_s3_url()[5:].split("/")[0], MODEL_BUCKET) as url:
            mp.setenv("AWS_ENDPOINT_URL_S3", url)
            mp.setenv("DRIVEVLA_MODEL_BUCKET", MODEL_BUCKET)
            yield url


@pytest.fixture(scope="module")
def prefect_api(s3):
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def repo(prefect_api, tmp_path_factory) -> Path:
    """The project in a temp git + DVC repo (S3 remote as in .dvc/config), after one pipeline run."""
    from flows.pipeline import pipeline

    r = make_project_repo(tmp_path_factory.mktemp("orch") / "repo", params=SMOKE_PARAMS)
    sh([sys.executable, "-m", "dvc", "remote", "add", "s3", dvc_s3_url()], r)
    sh([sys.executable, "-m", "dvc", "remote", "modify", "--local", "s3", "endpointurl", os.environ["AWS_ENDPOINT_URL_S3"]], r)
    sh(["git", "commit", "-qam", "s3 remote"], r)
    t0 = time.perf_counter()
    pipeline(workdir=str(r))
    TIMINGS["first_run_s"] = time.perf_counter() - t0
    return r


@pytest.fixture(scope="module")
def store(s3) -> ModelStore:
    return ModelStore(make_client(S3Settings.from_env()), MODEL_BUCKET, MODEL)


def summary(repo: Path) -> dict:
    return json.loads((repo / "runs" / "pipeline" / "summary.json").read_text())


def statuses(repo: Path) -> dict[str, str]:
    return {name: info["status"] for name, info in summary(repo)["stages"].items()}


def stage_names(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def affected_by(repo: Path, section: str) -> set[str]:
    """The stages whose params track ``section`` and every stage downstream of them, read from dvc.yaml."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    hit = {name for name, spec in stages.items() if section in spec.get("params", [])}
    while True:
        outs = {o if isinstance(o, str) else next(iter(o)) for n in hit for o in stages[n].get("outs", [])}
        more = {name for name, spec in stages.items() if set(spec.get("deps", [])) & outs} - hit
        if not more:
            return hit
        hit |= more


def expect(repo: Path, ran: set[str]) -> dict[str, str]:
    """Every dvc.yaml stage skipped except ``ran``."""
    return {name: "ran" if name in ran else "skipped" for name in stage_names(repo)}


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of every DVC-cached output that dvc.lock lists."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    outs = [o["path"] for entry in lock.values() for o in entry.get("outs", [])]
    out = {}
    for d in outs:
        path = root / d
        for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------ caching keyed on DVC's view


def test_first_run_runs_every_stage_and_records_lineage(repo):
    from prefect.artifacts import Artifact

    assert statuses(repo) == expect(repo, set(stage_names(repo)))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    lin = summary(repo)["lineage"]
    assert lin["git"]["commit"] == sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert lin["outs"]["export"] == {o["path"]: o["md5"] for o in lock["export"]["outs"]}
    assert lin["params"]["preset"] == "smoke"
    lineage_md = Artifact.get("lineage").data
    assert lin["git"]["commit"] in lineage_md and lock["online"]["outs"][0]["md5"][:12] in lineage_md
    export_md = Artifact.get("stage-export").data
    assert "onnx_max_abs_error" in export_md and "`exports`" in export_md and "/files/md5/" in export_md
    assert "i2t_recall@1" in Artifact.get("stage-pretrain").data  # the plot's points
    print(f"\nfirst full smoke run through DVC: {TIMINGS['first_run_s']:.1f} s")


def test_no_change_rerun_skips_every_stage_in_seconds(repo):
    from flows.pipeline import pipeline

    lock_before = (repo / "dvc.lock").read_text()
    t0 = time.perf_counter()
    results = pipeline(workdir=str(repo))
    TIMINGS["no_change_s"] = elapsed = time.perf_counter() - t0
    assert statuses(repo) == {s: "skipped" for s in results}
    assert results["export"]["onnx_parity_passed"] is True, "a cached stage still returns its metrics"
    assert (repo / "dvc.lock").read_text() == lock_before
    assert elapsed < 30, f"no-change re-run took {elapsed:.1f} s"
    print(f"\nno-change re-run ({len(results)} stages skipped): {elapsed:.1f} s")


def test_params_change_reruns_exactly_the_affected_stages(repo):
    from flows.pipeline import pipeline

    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    t0 = time.perf_counter()
    pipeline(workdir=str(repo), overrides=["online.total_timesteps=96"])
    TIMINGS["params_change_s"] = time.perf_counter() - t0
    rerun = affected_by(repo, "online")
    assert {"online", "export"} <= rerun and not {"data", "pretrain"} & rerun
    assert statuses(repo) == expect(repo, rerun)
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock_after["offline"] == lock_before["offline"]
    assert lock_after["online"]["outs"] != lock_before["online"]["outs"]
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], repo).stdout) == {}
    print(f"\nparams change (online and downstream rerun): {TIMINGS['params_change_s']:.1f} s")


# ------------------------------------------------------------------ the S3 remote


def test_dvc_push_to_s3_and_pull_into_fresh_clone_gives_identical_hashes(repo, tmp_path):
    from tasks.dvc_tasks import dvc_push

    dvc_push(str(repo), remote="s3")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "pipeline outputs"], repo)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    sh([sys.executable, "-m", "dvc", "remote", "modify", "--local", "s3", "endpointurl", os.environ["AWS_ENDPOINT_URL_S3"]], clone)
    sh([sys.executable, "-m", "dvc", "pull", "-r", "s3"], clone)
    original, pulled = tree_hashes(repo), tree_hashes(clone)
    assert len(original) > 10 and pulled == original
    assert json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], clone).stdout) == {}


# ------------------------------------------------------------------ deployments served through the API


@pytest.fixture(scope="module")
def served(repo, tmp_path_factory):
    """``python -m flows.ops_cli serve`` in the repo, against the harness API; stopped at the end."""
    from prefect.settings import get_current_settings

    from tests.integration.helpers import venv_env

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = venv_env(PREFECT_API_URL=str(get_current_settings().api.url), PREFECT_RUNNER_POLL_FREQUENCY="1")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "flows.ops_cli", "serve", "--workdir", str(repo),
                                 "--prefect-yaml", str(ROOT / "prefect.yaml")],
                                cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _deployments_exist():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not register its deployments:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield log
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _deployments_exist() -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name("drivevla-pipeline/pipeline")
            client.read_deployment_by_name("drivevla-retrain/retrain")
            return True
        except Exception:  # noqa: BLE001 - not registered yet
            return False


def _run(name: str, parameters: dict, log: Path):
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=420, poll_interval=2)
    assert run.state is not None and run.state.is_completed(), \
        f"{name}: {run.state}\n{log.read_text()[-4000:]}"
    return run


def test_served_pipeline_deployment_run_completes_the_smoke_pipeline(served, repo):
    t0 = time.perf_counter()
    _run("drivevla-pipeline/pipeline",
         {"preset": "smoke", "workdir": str(repo), "overrides": ["export.atol=0.0002"]}, served)
    TIMINGS["deployment_run_s"] = time.perf_counter() - t0
    assert statuses(repo) == expect(repo, {"export"})
    assert yaml.safe_load((repo / "params.yaml").read_text())["export"]["atol"] == 0.0002
    assert json.loads((repo / "metrics" / "export.json").read_text())["onnx_parity_passed"] is True
    print(f"\nserved deployment run (export rerun): {TIMINGS['deployment_run_s']:.1f} s")


def test_retrain_deployment_cron_is_the_configured_one(served):
    from prefect.client.orchestration import get_client

    from flows.deployments import spec_by_name

    configured = spec_by_name("retrain", ROOT / "prefect.yaml").schedules[0]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("drivevla-retrain/retrain")
        pipeline_dep = client.read_deployment_by_name("drivevla-pipeline/pipeline")
    assert [s.schedule.cron for s in deployment.schedules] == [configured.cron]
    assert deployment.schedules[0].schedule.timezone == configured.timezone
    assert pipeline_dep.schedules == []


def candidate_metrics(repo: Path) -> dict:
    """metrics/evaluate.json: the evaluate stage's when dvc.yaml has one, else a constructed one."""
    path = repo / "metrics" / "evaluate.json"
    if "evaluate" not in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        path.write_text(json.dumps({"driving_score": 0.5, "route_completion": 0.8, "collisions_per_km": 0.1,
                                    "mean_speed": 7.0}))
    return json.loads(path.read_text())


def seed_production(repo: Path, store: ModelStore, metrics: dict, label: str) -> str:
    """Make a version with the given metrics production, as an earlier promotion would have."""
    sh(["git", "checkout", "-q", "-b", f"seed-{label}"], repo)
    sh(["git", "commit", "-q", "--allow-empty", "-m", f"production {label}"], repo)
    commit = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    version = register_version(repo, MODEL, ref=commit)
    sh(["git", "checkout", "-q", "-"], repo)
    store.upload_version(version, collect_files(repo / "exports"), {"metrics": metrics, "lineage": {"git_commit": commit}})
    store.move_pointer(version, git_commit=commit)
    assign_stage(repo, MODEL, version)
    return version


RETRAIN_PARAMS = {"preset": "smoke", "dvc_remote": "s3", "pull": True, "warm_start": True}


def test_retrain_run_promotes_a_better_candidate(served, repo, store):
    cand = candidate_metrics(repo)
    old = seed_production(repo, store, dict(cand, driving_score=cand["driving_score"] - 0.2,
                                            onnx_max_abs_error=1e-8), "worse")
    t0 = time.perf_counter()
    _run("drivevla-retrain/retrain", dict(RETRAIN_PARAMS, workdir=str(repo)), served)
    TIMINGS["retrain_run_s"] = time.perf_counter() - t0
    new = store.production_version()
    assert new not in (None, old)
    assert stage_version(repo, MODEL) == new
    assert store.pointer().history[-1] == old
    card = store.card(new)
    # The retrained candidate (online RL restarted from the production checkpoint) is what was promoted.
    retrained = candidate_metrics(repo)
    assert card["metrics"]["driving_score"] == retrained["driving_score"] and card["replaces"] == old
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["online"]["init_from"] == f"checkpoints/production/{old}"
    assert card["lineage"]["git_commit"] == sh(["git", "rev-list", "-n", "1", f"{MODEL}@{new}"], repo).stdout.strip()
    published = store.manifest(new)["files"]["policy.onnx"]["sha256"]
    assert published == hashlib.sha256((repo / "exports" / "policy.onnx").read_bytes()).hexdigest()
    # The production checkpoint the run started from was fetched and verified.
    assert (repo / "checkpoints" / "production" / old / "model.safetensors").exists()
    print(f"\nretrain deployment run (online from production, evaluate, export, promotion): "
          f"{TIMINGS['retrain_run_s']:.1f} s")


def test_retrain_run_rejects_a_worse_candidate(served, repo, store):
    from prefect.artifacts import Artifact

    cand = candidate_metrics(repo)
    better = seed_production(repo, store, dict(cand, driving_score=cand["driving_score"] + 0.2), "better")
    tags = sh(["git", "tag"], repo).stdout
    _run("drivevla-retrain/retrain", dict(RETRAIN_PARAMS, workdir=str(repo)), served)
    assert store.production_version() == better
    assert stage_version(repo, MODEL) == better
    assert sh(["git", "tag"], repo).stdout == tags, "a rejected candidate registers nothing"
    report = Artifact.get("promotion").data
    assert "candidate rejected" in report and "min_driving_score_delta" in report


# ------------------------------------------------------------------ failure, retry, rollback, bad S3


def test_failure_after_upload_before_pointer_keeps_production_then_retry_succeeds(repo, store, monkeypatch):
    from flows.promote import promote
    from infra.registry import ModelStore as Store

    before = store.production_version()
    sh(["git", "commit", "-q", "--allow-empty", "-m", "a new candidate"], repo)
    permissive = PromotionThresholds(min_driving_score_delta=-1.0)

    def broken(self, version, git_commit=None):
        raise ConnectionError("injected: connection lost before the pointer moved")

    monkeypatch.setattr(Store, "move_pointer", broken)
    with pytest.raises(ConnectionError, match="injected"):
        promote(workdir=str(repo), thresholds=permissive)
    assert store.production_version() == before
    assert stage_version(repo, MODEL) == before
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    attempted = next(v for v, sha in registered_versions(repo, MODEL).items() if sha == head)
    assert store.manifest(attempted) is not None, "the upload happened before the failure"

    monkeypatch.undo()
    result = promote(workdir=str(repo), thresholds=permissive)
    assert result["promoted"] and result["version"] == attempted
    assert store.production_version() == attempted == stage_version(repo, MODEL)


def test_rollback_returns_to_the_previous_version(repo, store):
    from typer.testing import CliRunner

    from flows.ops_cli import ops_app

    current = store.production_version()
    previous = store.pointer().history[-1]
    out = CliRunner().invoke(ops_app, ["promote", "--rollback", "--workdir", str(repo)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["to"] == previous
    assert store.production_version() == previous != current
    assert stage_version(repo, MODEL) == previous


def test_hand_edited_metrics_are_refused_and_production_record_kept(repo, store):
    from flows.promote import promote
    from tasks.registry_tasks import ModifiedOutputs

    sh(["git", "commit", "-q", "--allow-empty", "-m", "a candidate with edited metrics"], repo)
    live = store.production_version()
    record = store.card(live)
    tags = sh(["git", "tag"], repo).stdout
    path = repo / "metrics" / "evaluate.json"
    original = path.read_text()
    path.write_text(json.dumps(dict(json.loads(original), driving_score=0.99)))
    try:
        with pytest.raises(ModifiedOutputs, match=r"metrics/evaluate.json \(modified\).*dvc checkout"):
            promote(workdir=str(repo), thresholds=PromotionThresholds(min_driving_score_delta=-1.0))
    finally:
        path.write_text(original)
    assert store.production_version() == live and store.card(live) == record
    assert stage_version(repo, MODEL) == live
    assert sh(["git", "tag"], repo).stdout == tags, "nothing was registered"


def test_failed_upload_mid_promotion_keeps_production_then_retry_succeeds(repo, store, monkeypatch):
    from flows.promote import promote
    from infra.model_store import ModelStore as Store
    from infra.s3 import S3Error

    before, history = store.production_version(), store.pointer().history
    sh(["git", "commit", "-q", "--allow-empty", "-m", "a candidate whose upload fails"], repo)
    real = Store._upload_file

    def dies_on_onnx(self, path, key):
        if key.endswith("policy.onnx"):
            raise S3Unreachable(f"cannot upload to s3://{self.bucket}: injected connection loss mid-upload")
        return real(self, path, key)

    monkeypatch.setattr(Store, "_upload_file", dies_on_onnx)
    permissive = PromotionThresholds(min_driving_score_delta=-1.0)
    with pytest.raises(S3Error, match="injected connection loss"):
        promote(workdir=str(repo), thresholds=permissive)
    assert store.production_version() == before and store.pointer().history == history
    assert stage_version(repo, MODEL) == before
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    attempted = next(v for v, sha in registered_versions(repo, MODEL).items() if sha == head)
    assert store.manifest(attempted) is None, "the half-uploaded version has no manifest"

    monkeypatch.undo()
    result = promote(workdir=str(repo), thresholds=permissive)
    assert result["promoted"] and result["version"] == attempted
    assert store.production_version() == attempted == stage_version(repo, MODEL)


def test_s3_unreachable_or_wrong_credentials_promote_nothing(repo, store, monkeypatch, s3):
    from flows.promote import promote

    sh(["git", "commit", "-q", "--allow-empty", "-m", "another candidate"], repo)
    before, tags = store.production_version(), sh(["git", "tag"], repo).stdout
    permissive = PromotionThresholds(min_driving_score_delta=-1.0)

    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(S3Unreachable, match=f"{closed}.*unreachable"):
        promote(workdir=str(repo), thresholds=permissive, endpoint_url=closed)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with moto_auth_enforced(s3):
        with pytest.raises(S3AccessDenied, match="rejected the credentials"):
            promote(workdir=str(repo), thresholds=permissive)
    monkeypatch.undo()
    assert store.production_version() == before
    assert sh(["git", "tag"], repo).stdout == tags, "nothing was registered"
    print("\ntimings:", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))
