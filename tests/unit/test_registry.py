"""The model registry: promotion thresholds, GTO versions/stages on a real git repo, and publishing to a
real S3 endpoint (moto server on a free port): pointer moved last, rollback, clear errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests

from infra.registry import (ModelStore, PromotionThresholds, RegistryError, assign_stage, commit_lineage, judge,
                            register_version, registered_versions, stage_version)
from infra.s3 import (S3AccessDenied, S3NotConfigured, S3Settings, S3Unreachable, bucket_from_env, check_bucket,
                      make_client)

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
             "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def moto_s3(*buckets: str) -> Iterator[str]:
    """A real S3 endpoint (moto server) on a free port, with ``buckets`` created; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        client = make_client(S3Settings(endpoint_url=url))
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()


@contextmanager
def moto_auth_enforced(url: str) -> Iterator[None]:
    """Make moto check every request's access key (it accepts any key by default)."""
    requests.post(f"{url}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{url}/moto-api/reset-auth", data=b"1e18", timeout=5).raise_for_status()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_url():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_KEYS.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "DRIVEVLA_S3_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        with moto_s3("models") as url:
            yield url


@pytest.fixture
def store(s3_url, request):
    # A model name per test keeps the tests independent inside one bucket.
    return ModelStore(make_client(S3Settings(endpoint_url=s3_url)), "models", request.node.name.replace("_", "-")[:60])


@pytest.fixture
def exports(tmp_path) -> Path:
    d = tmp_path / "exports"
    (d / "pytorch").mkdir(parents=True)
    (d / "policy.onnx").write_bytes(os.urandom(4096))
    (d / "pytorch" / "model.safetensors").write_bytes(os.urandom(2048))
    (d / "parity.json").write_text(json.dumps({"max_abs": 1e-8}))
    return d


def files_of(d: Path) -> dict[str, Path]:
    return {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ the decision

GOOD = {"driving_score": 0.80, "route_completion": 0.90, "collisions_per_km": 0.2, "onnx_max_abs_error": 1e-7}


def test_judge_accepts_a_better_candidate():
    prod = dict(GOOD, driving_score=0.70)
    decision = judge(GOOD, prod, PromotionThresholds(min_driving_score_delta=0.05))
    assert decision.accepted, decision.summary()
    assert "delta +0.1000" in decision.summary()


def test_judge_rejects_a_worse_candidate_and_says_why():
    prod = dict(GOOD, driving_score=0.90)
    decision = judge(GOOD, prod, PromotionThresholds())
    assert not decision.accepted
    assert decision.reasons == ["driving_score 0.8000 vs production 0.9000 (delta -0.1000 < min_driving_score_delta 0.01)"]


def test_judge_rejects_equal_score_by_default_margin():
    assert not judge(GOOD, dict(GOOD), PromotionThresholds()).accepted


def test_judge_rejects_parity_and_guard_regressions():
    bad = dict(GOOD, onnx_max_abs_error=3e-3, driving_score=0.95, collisions_per_km=2.0)
    decision = judge(bad, GOOD, PromotionThresholds(max_parity_error=1e-4))
    assert not decision.accepted
    failed = {c.name for c in decision.checks if not c.passed}
    assert failed == {"parity", "collisions_per_km"}


def test_judge_first_model_needs_score_and_parity():
    assert judge(GOOD, None).accepted
    missing = judge({"onnx_max_abs_error": 1e-7}, None)
    assert not missing.accepted and "run the evaluate stage" in missing.reasons[0]


def test_thresholds_reject_unknown_keys():
    with pytest.raises(ValueError, match="min_score"):
        PromotionThresholds(min_score=1)


# ------------------------------------------------------------------ S3 settings and errors


def test_settings_come_from_the_environment_never_the_repo():
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2", "AWS_PROFILE": "ci",
           "AWS_DEFAULT_REGION": "eu-west-1"}
    s = S3Settings.from_env(env)
    assert (s.endpoint_url, s.profile, s.region) == ("http://s3only:2", "ci", "eu-west-1")
    assert S3Settings.from_env({"DRIVEVLA_S3_ENDPOINT_URL": "http://mine:3", **env}).endpoint_url == "http://mine:3"
    assert S3Settings.from_env({}).endpoint_url is None
    assert bucket_from_env(None, {"DRIVEVLA_MODEL_BUCKET": "s3://models/"}) == "models"
    with pytest.raises(S3NotConfigured, match="DRIVEVLA_MODEL_BUCKET"):
        bucket_from_env(None, {})


def test_unreachable_endpoint_is_a_clear_error(s3_url):
    url = f"http://127.0.0.1:{free_port()}"
    client = make_client(S3Settings(endpoint_url=url, connect_timeout_s=2, max_attempts=1))
    with pytest.raises(S3Unreachable) as err:
        check_bucket(client, "models")
    assert url in str(err.value) and "unreachable" in str(err.value) and "AWS_ENDPOINT_URL_S3" in str(err.value)


def test_wrong_credentials_are_a_clear_error(s3_url, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    client = make_client(S3Settings(endpoint_url=s3_url))
    with moto_auth_enforced(s3_url):
        with pytest.raises(S3AccessDenied) as err:
            check_bucket(client, "models")
    assert "rejected the credentials" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_missing_credentials_are_a_clear_error(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(S3NotConfigured, match="AWS_ACCESS_KEY_ID"):
        make_client(S3Settings(endpoint_url="http://127.0.0.1:1"))


# ------------------------------------------------------------------ publishing and the pointer


def test_pointer_moves_last_and_readers_see_whole_versions(store, exports):
    assert store.pointer() is None
    manifest = store.upload_version("v0.1.0", files_of(exports), {"metrics": GOOD})
    # Uploaded but not pointed at: nothing is in production yet.
    assert store.production_version() is None
    assert set(manifest["files"]) == {"policy.onnx", "parity.json", "pytorch/model.safetensors", "registry.json"}
    store.move_pointer("v0.1.0")
    assert store.production_version() == "v0.1.0"
    assert store.card("v0.1.0")["metrics"] == GOOD


def test_pointer_refuses_a_version_without_manifest(store, exports):
    store.client.upload_file(str(exports / "policy.onnx"), store.bucket, store.key("v9.9.9", "policy.onnx"))
    with pytest.raises(RegistryError, match="never fully published"):
        store.move_pointer("v9.9.9")
    assert store.pointer() is None


def test_failure_before_pointer_keeps_production_then_retry_and_rollback(store, exports, tmp_path):
    store.upload_version("v0.1.0", files_of(exports), {"metrics": GOOD})
    store.move_pointer("v0.1.0")
    # The next version is uploaded, then the promotion dies before the pointer moves.
    (exports / "policy.onnx").write_bytes(os.urandom(4096))
    store.upload_version("v0.2.0", files_of(exports), {"metrics": GOOD})
    assert store.production_version() == "v0.1.0"
    # The retry re-uploads (idempotent keys) and moves the pointer.
    store.upload_version("v0.2.0", files_of(exports), {"metrics": GOOD})
    assert store.move_pointer("v0.2.0").history == ["v0.1.0"]
    got = store.download("v0.2.0", tmp_path / "dl")
    assert (tmp_path / "dl" / "policy.onnx").read_bytes() == (exports / "policy.onnx").read_bytes()
    assert len(got) == 4
    back = store.rollback_pointer()
    assert (back.version, back.history) == ("v0.1.0", [])
    with pytest.raises(RegistryError, match="no previous version"):
        store.rollback_pointer()


def test_download_detects_corruption(store, exports, tmp_path):
    store.upload_version("v0.1.0", files_of(exports), {"metrics": GOOD})
    store.client.put_object(Bucket=store.bucket, Key=store.key("v0.1.0", "parity.json"),
                            Body=(exports / "parity.json").read_bytes().replace(b"1e", b"2e"))
    with pytest.raises(RegistryError, match="sha256 differs"):
        store.download("v0.1.0", tmp_path / "dl")


# ------------------------------------------------------------------ GTO on a git repository


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def new_git_repo(path: Path) -> Path:
    """An empty git repository at ``path`` with a committer set."""
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "user.email", "t@drivevla.org")
    git(path, "config", "user.name", "tests")
    return path


@pytest.fixture
def repo(tmp_path) -> Path:
    r = new_git_repo(tmp_path / "repo")
    (r / "dvc.yaml").write_text("stages: {}\nartifacts:\n  driving-policy:\n    path: exports/policy.onnx\n    type: model\n")
    (r / "code.py").write_text("x = 1\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "init")
    return r


def test_register_assign_and_roll_back_with_gto(repo):
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    first = commit_lineage(repo, "candidate 1")
    assert git(repo, "show", "--name-only", "--format=", "HEAD") == "dvc.lock"
    v1 = register_version(repo, "driving-policy", ref=first)
    assert v1 == "v0.1.0"
    assert register_version(repo, "driving-policy", ref=first) == v1, "a commit keeps its version"
    assign_stage(repo, "driving-policy", v1)
    assert stage_version(repo, "driving-policy") == v1

    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {export: {}}\n")
    second = commit_lineage(repo, "candidate 2")
    v2 = register_version(repo, "driving-policy", ref=second)
    assert v2 == "v0.2.0" and registered_versions(repo, "driving-policy") == {v1: first, v2: second}
    assign_stage(repo, "driving-policy", v2)
    assert stage_version(repo, "driving-policy") == v2
    assign_stage(repo, "driving-policy", v1, message="rollback")
    assert stage_version(repo, "driving-policy") == v1
    assert "driving-policy#prod#3" in git(repo, "tag")


def test_commit_lineage_refuses_uncommitted_code(repo):
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "code.py").write_text("x = 2\n")
    with pytest.raises(RegistryError, match="uncommitted changes in code.py"):
        commit_lineage(repo, "candidate")


# ------------------------------------------------------------------ the operator commands


def test_ops_commands_mount_on_a_parent_app():
    import typer
    from typer.testing import CliRunner

    from flows.ops_cli import ops_app

    parent = typer.Typer()

    @parent.command()
    def other() -> None:
        """another command"""

    parent.add_typer(ops_app)
    runner = CliRunner()
    out = runner.invoke(parent, ["--help"]).output
    assert "serve" in out and "promote" in out
    assert "--rollback" in runner.invoke(parent, ["promote", "--help"]).output


# ------------------------------------------------------------------ thresholds: one type, finite numbers


@pytest.mark.parametrize("key, value", [("min_driving_score_delta", float("nan")), ("max_parity_error", "nan"),
                                        ("min_driving_score_delta", float("inf")),
                                        ("max_drop", {"route_completion": float("nan")}),
                                        ("max_rise", {"collisions_per_km": float("-inf")})])
def test_thresholds_reject_non_finite_numbers(key, value):
    with pytest.raises(ValueError, match="not a finite number") as err:
        PromotionThresholds(**{key: value})
    assert key in str(err.value)


def test_config_promote_section_is_the_thresholds_type_and_rejects_nan():
    from stages.config import ConfigError, PipelineConfig, PromoteParams, build_config

    assert PromoteParams is PromotionThresholds
    assert PipelineConfig.model_fields["promote"].annotation is PromotionThresholds
    assert build_config(overrides=["promote.min_driving_score_delta=0.02"]).promote.min_driving_score_delta == 0.02
    for override in ("promote.min_driving_score_delta=.nan", "promote.max_parity_error=nan",
                     "promote.max_drop.route_completion=.nan"):
        with pytest.raises(ConfigError, match="not a finite number") as err:
            build_config(overrides=[override])
        assert "promote." in str(err.value)


def test_promote_command_rejects_a_nan_threshold():
    from typer.testing import CliRunner

    from flows.ops_cli import ops_app

    out = CliRunner().invoke(ops_app, ["promote", "--min-score-delta", "nan"])
    assert out.exit_code == 2 and "not a finite number" in out.output


# ------------------------------------------------------------------ a published version is immutable


def test_published_version_is_never_rewritten(store, exports):
    live = {"metrics": dict(GOOD, driving_score=0.6666), "lineage": {"git_commit": "a" * 40}}
    store.upload_version("v0.1.0", files_of(exports), live)
    store.move_pointer("v0.1.0")
    manifest_before = store.manifest("v0.1.0")
    # The same version again with hand-edited metrics: refused, the live record untouched.
    edited = {"metrics": dict(GOOD, driving_score=0.99), "lineage": live["lineage"]}
    with pytest.raises(RegistryError, match=r"already published with different content \(registry.json:metrics\)"):
        store.upload_version("v0.1.0", files_of(exports), edited)
    # ... or with other files.
    (exports / "policy.onnx").write_bytes(os.urandom(4096))
    with pytest.raises(RegistryError, match=r"different content \(policy.onnx\).*immutable"):
        store.upload_version("v0.1.0", files_of(exports), live)
    assert store.card("v0.1.0")["metrics"]["driving_score"] == 0.6666
    assert store.manifest("v0.1.0") == manifest_before
    assert store.production_version() == "v0.1.0"


def test_publishing_the_same_version_again_unchanged_is_a_no_op(store, exports):
    card = {"metrics": GOOD, "lineage": {"git_commit": "b" * 40}}
    first = store.upload_version("v0.1.0", files_of(exports), card)
    assert store.upload_version("v0.1.0", files_of(exports), dict(card, replaces="v0.0.9")) == first


# ------------------------------------------------------------------ names from the bucket are not paths yet


def _hostile_manifest(store: ModelStore, version: str, names: list[str], exports: Path) -> None:
    """Publish a good version, then add objects under ``names`` and a manifest listing them (with their
    true sha256 and size, so only the names are wrong)."""
    import hashlib

    good = store.upload_version(version, files_of(exports), {"metrics": GOOD})
    files = dict(good["files"])
    for name in names:
        body = b"written by whoever controls the bucket"
        store.client.put_object(Bucket=store.bucket, Key=store.key(version, name), Body=body)
        files[name] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    store.client.put_object(Bucket=store.bucket, Key=store.key(version, "manifest.json"),
                            Body=json.dumps(dict(good, files=files)).encode())


@pytest.mark.parametrize("name", ["pytorch/../../../escaped.txt", "/tmp/absolute.txt", "pytorch/./x",
                                  "pytorch/a\\..\\..\\b", "pytorch/x y"])
def test_hostile_manifest_is_rejected_whole_and_nothing_is_written(store, exports, tmp_path, name):
    import hashlib

    # The parametrised runs share a truncated test name: one model per hostile name.
    store = ModelStore(store.client, store.bucket, "hostile-" + hashlib.sha256(name.encode()).hexdigest()[:12])
    _hostile_manifest(store, "v0.1.0", [name], exports)
    area = tmp_path / "area"
    dest = area / "checkpoints" / "production" / "v0.1.0"
    area.mkdir()
    with pytest.raises(RegistryError, match="refusing"):
        store.download("v0.1.0", dest, prefix="pytorch/")
    assert [p for p in area.rglob("*")] == [], "nothing written, inside or outside the destination"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["area", "exports"]


def test_hostile_pointer_version_is_rejected_before_any_path_is_made(store, exports, tmp_path):
    from tasks.registry_tasks import download_production

    store.upload_version("v0.1.0", files_of(exports), {"metrics": GOOD})
    store.move_pointer("v0.1.0")
    pointer = json.loads(store.client.get_object(Bucket=store.bucket, Key=store.pointer_key)["Body"].read())
    store.client.put_object(Bucket=store.bucket, Key=store.pointer_key,
                            Body=json.dumps(dict(pointer, version="../../outside")).encode())
    dest = tmp_path / "area" / "production"
    with pytest.raises(RegistryError, match=r"'../../outside'.*not of the form vX.Y.Z"):
        download_production.fn(str(dest), store.bucket, store.model, store.where)
    assert not (tmp_path / "area").exists() and not (tmp_path / "outside").exists()


def test_manifest_names_are_checked_one_by_one():
    from infra.manifest import UnsafeName, check_file_name, check_version, path_inside

    assert check_file_name("pytorch/model.safetensors") == "pytorch/model.safetensors"
    assert check_version("v0.12.3") == "v0.12.3"
    for bad in ("..", "a/../b", "/etc/passwd", "C:x", "a//b", "", "a b", "a\x00b", None):
        with pytest.raises(UnsafeName):
            check_file_name(bad)
    for bad in ("v1.2", "1.2.3", "v1.2.3/..", "v1.2.3\n", "../v1.2.3", 3):
        with pytest.raises(UnsafeName):
            check_version(bad)
    with pytest.raises(UnsafeName):
        path_inside(Path("/srv/dest"), "..")


def test_download_keeps_the_destination_when_a_file_is_corrupt(store, exports, tmp_path):
    store.upload_version("v0.1.0", files_of(exports), {"metrics": GOOD})
    dest = tmp_path / "dl"
    store.download("v0.1.0", dest)
    before = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    store.client.put_object(Bucket=store.bucket, Key=store.key("v0.1.0", "parity.json"),
                            Body=(exports / "parity.json").read_bytes().replace(b"1e", b"2e"))
    with pytest.raises(RegistryError, match="sha256 differs"):
        store.download("v0.1.0", dest)
    after = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no staging left behind"


# ------------------------------------------------------------------ a failed upload moves nothing


def test_failed_upload_mid_version_keeps_production_and_a_retry_completes_it(store, exports, monkeypatch):
    store.upload_version("v0.1.0", files_of(exports), {"metrics": GOOD})
    store.move_pointer("v0.1.0")
    (exports / "policy.onnx").write_bytes(os.urandom(4096))
    real = ModelStore._upload_file
    calls = []

    def dies_on_second(self, path, key):
        calls.append(key)
        if len(calls) == 2:
            from infra.s3 import S3Unreachable
            raise S3Unreachable(f"cannot upload to s3://{self.bucket}: injected connection loss")
        return real(self, path, key)

    monkeypatch.setattr(ModelStore, "_upload_file", dies_on_second)
    with pytest.raises(S3Unreachable, match="injected"):
        store.upload_version("v0.2.0", files_of(exports), {"metrics": GOOD})
    assert store.manifest("v0.2.0") is None, "an incomplete version has no manifest"
    with pytest.raises(RegistryError, match="never fully published"):
        store.move_pointer("v0.2.0")
    assert store.production_version() == "v0.1.0" and store.pointer().history == []
    monkeypatch.undo()
    store.upload_version("v0.2.0", files_of(exports), {"metrics": GOOD})
    assert store.move_pointer("v0.2.0").history == ["v0.1.0"]


# ------------------------------------------------------------------ outputs must match dvc.lock


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A git + DVC repo with one stage writing a git-tracked metric and a DVC-cached exports/ dir."""
    import sys

    r = new_git_repo(tmp_path / "dvcrepo")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=r, check=True)
    (r / "make.py").write_text(
        "import json, pathlib\n"
        "pathlib.Path('metrics').mkdir(exist_ok=True); pathlib.Path('exports/pytorch').mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path('metrics/evaluate.json').write_text(json.dumps({'driving_score': 0.6666}))\n"
        "pathlib.Path('exports/policy.onnx').write_text('onnx')\n"
        "pathlib.Path('exports/pytorch/model.safetensors').write_text('weights')\n")
    (r / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: python make.py\n    deps: [make.py]\n"
                                "    outs: [exports]\n    metrics:\n      - metrics/evaluate.json:\n"
                                "          cache: false\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=r, check=True, env=env)
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "pipeline")
    return r


def test_promotion_refuses_outputs_edited_by_hand(dvc_repo):
    from tasks.registry_tasks import ModifiedOutputs, modified_outputs, verify_outputs

    assert modified_outputs(dvc_repo) == {}
    verify_outputs.fn(str(dvc_repo))  # untouched outputs pass
    (dvc_repo / "metrics" / "evaluate.json").write_text(json.dumps({"driving_score": 0.99}))
    (dvc_repo / "exports" / "pytorch" / "model.safetensors").write_text("other weights")
    assert modified_outputs(dvc_repo) == {"metrics/evaluate.json": "modified",
                                          "exports/pytorch/model.safetensors": "modified"}
    with pytest.raises(ModifiedOutputs) as err:
        verify_outputs.fn(str(dvc_repo))
    message = str(err.value)
    assert "metrics/evaluate.json (modified)" in message and "exports/pytorch/model.safetensors (modified)" in message
    assert "`git checkout -- metrics/evaluate.json`" in message and "`dvc checkout`" in message
    assert "dvc repro" in message
    (dvc_repo / "exports" / "policy.onnx").unlink()
    assert modified_outputs(dvc_repo)["exports/policy.onnx"] == "modified"


# ------------------------------------------------------------------ optional packages and layering


def test_missing_boto3_names_the_s3_extra(monkeypatch):
    import sys

    from infra.packages import MissingPackage

    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(MissingPackage, match=r"'boto3'.*publishing models to S3.*pip install -e \.\[s3\]"):
        make_client(S3Settings(endpoint_url="http://127.0.0.1:1"))


def test_missing_gto_names_the_registry_extra(monkeypatch, repo):
    import sys

    from infra.packages import MissingPackage

    monkeypatch.setitem(sys.modules, "gto.api", None)
    with pytest.raises(MissingPackage, match=r"'gto'.*GTO tags.*pip install -e \.\[registry\]"):
        register_version(repo, "driving-policy")
    with pytest.raises(MissingPackage, match=r"\[registry\]"):
        assign_stage(repo, "driving-policy", "v0.1.0")
