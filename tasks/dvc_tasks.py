"""DVC from Prefect: one lock for every DVC call, DVC's view of a stage as a cache key, push/pull
tasks with retries, and the lineage of a workspace (git commit, ``dvc.lock`` hashes, params).

DVC refuses concurrent use of a workspace ("Unable to acquire lock"), so every DVC call made here —
a ``dvc`` subprocess or the in-process ``dvc.repo.Repo`` used for cache keys — holds
:func:`dvc_lock` first. Two flows on one workspace then wait for each other instead of failing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from filelock import FileLock, Timeout
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from infra.s3 import checksum_env

log = logging.getLogger(__name__)

LOCK_NAME = "drivevla-dvc.lock"
# A full `carla` pipeline stage can hold the lock for hours; waiting that long for it is right.
DEFAULT_LOCK_TIMEOUT_S = 24 * 3600.0


class DvcError(RuntimeError):
    """A DVC command failed; the message carries the end of its output."""


class DvcTimeout(DvcError):
    """A DVC command ran past its time limit and was killed."""


class DvcLockTimeout(DvcError):
    """Another DVC command held the workspace for longer than we were willing to wait."""


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def lock_path(root: str | Path) -> Path:
    root = Path(root)
    base = root / ".dvc" / "tmp" if (root / ".dvc").is_dir() else root
    base.mkdir(parents=True, exist_ok=True)
    return base / LOCK_NAME


@contextmanager
def dvc_lock(root: str | Path, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the workspace's DVC lock (a file lock, so it also serialises separate processes)."""
    lock = FileLock(str(lock_path(root)), timeout=timeout_s)
    t0 = time.monotonic()
    try:
        lock.acquire()
    except Timeout:
        raise DvcLockTimeout(f"another DVC command has held {lock_path(root)} for over {timeout_s:.0f} s; "
                             "wait for it or stop it (a `dvc` process in this workspace)") from None
    waited = time.monotonic() - t0
    if waited > 1:
        _logger().info("waited %.1f s for the DVC lock", waited)
    try:
        yield
    finally:
        lock.release()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``dvc`` and the stage commands it runs.

    DVC runs ``python -m stages.X`` through the shell: put this interpreter first on PATH. S3 remotes
    that are not AWS need boto3's checksum settings relaxed.
    """
    env = checksum_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("SDL_VIDEODRIVER", "dummy")
    env.update(extra)
    return env


BAR_LOG_INTERVAL_S = 10.0


def run_streaming(cmd: list[str], cwd: str | Path, timeout_s: float | None = None,
                  logger: Any = None) -> str:
    """Run ``cmd``, logging its output line by line; kill it after ``timeout_s``.

    The subprocess carries the timeout because Prefect's ``timeout_seconds`` cannot interrupt a
    synchronous task on the thread-pool runner: the process group is killed, so DVC and the stage
    it runs both stop, and DVC's own lock is released with them.
    """
    logger = logger or _logger()
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, 15)
            time.sleep(5)
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    tail: list[str] = []
    last_bar = 0.0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            # tqdm redraws with carriage returns (each one a line here): keep the log readable by
            # passing on a progress bar at most every BAR_LOG_INTERVAL_S, and always when it completes.
            line = line.rstrip().rsplit("\r", 1)[-1]
            if not line:
                continue
            if "%|" in line and "100%|" not in line:
                if time.monotonic() - last_bar < BAR_LOG_INTERVAL_S:
                    continue
                last_bar = time.monotonic()
            logger.info(line)
            tail = (tail + [line])[-40:]
        code = proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
    if timed_out.is_set():
        raise DvcTimeout(f"{' '.join(cmd)} ran past its {timeout_s:.0f} s limit and was stopped:\n" + "\n".join(tail))
    if code != 0:
        raise DvcError(f"{' '.join(cmd)} exited with {code}:\n" + "\n".join(tail))
    return "\n".join(tail)


def dvc(args: list[str], root: str | Path, timeout_s: float | None = None, logger: Any = None) -> str:
    """``dvc <args>`` in ``root`` under the workspace lock."""
    with dvc_lock(root):
        return run_streaming([sys.executable, "-m", "dvc", *args], Path(root), timeout_s, logger)


# ------------------------------------------------------------------ DVC's view of a stage


def stage_inputs(root: str | Path, name: str, check_outs: bool = True) -> dict[str, Any] | None:
    """What DVC would record for the stage's inputs if it ran now: its command, the hashes of its
    deps (computed by DVC, through its state cache) and the values of its params.

    For an up-to-date stage this equals its ``dvc.lock`` entry minus ``outs``. Returns None when a dep
    does not exist, and with ``check_outs`` also when an output is missing or was modified.
    """
    from dvc.repo import Repo
    from dvc.stage.serialize import to_single_stage_lockfile

    with dvc_lock(root):
        with Repo(str(root)) as repo, repo.lock:
            stage = repo.stage.load_one(path=str(Path(root).resolve() / "dvc.yaml"), name=name)
            if check_outs and stage.changed_outs(allow_missing=False):
                return None
            try:
                stage.save_deps()
            except Exception as exc:  # a dep that does not exist yet: nothing to key on
                log.warning("stage %s: cannot hash its deps (%s); it will run", name, exc)
                return None
            entry = to_single_stage_lockfile(stage)
    return {k: entry.get(k) for k in ("cmd", "deps", "params")}


def stage_view_key(root: str | Path, name: str) -> str | None:
    """A cache key for stage ``name`` in ``root``: DVC's view of its inputs, not the run id.

    The key names the inputs only, so a run that has to make the outputs (first run, outputs
    deleted) stores its result under the key the next unchanged run will compute. Whether the
    outputs on disk still match is checked separately (``tasks.stage_tasks.stage_state``), and the
    flow refreshes the entry when they do not.
    """
    inputs = stage_inputs(root, name, check_outs=False)
    if inputs is None:
        return None
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    # The workspace path is part of the key: two clones share no outputs on disk.
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"drivevla-stage-{name}-{where}-{digest}"


def dvc_yaml_stages(root: str | Path) -> list[str]:
    """The stages declared in ``dvc.yaml``, in file order."""
    data = yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}
    return list((data.get("stages") or {}).keys())


def stage_spec(root: str | Path, name: str) -> dict[str, Any]:
    """The stage's entry in ``dvc.yaml``; empty when the workspace has none (a run without DVC)."""
    path = Path(root) / "dvc.yaml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return (data.get("stages") or {}).get(name, {})


def lock_entry(root: str | Path, name: str) -> dict[str, Any]:
    path = Path(root) / "dvc.lock"
    if not path.exists():
        return {}
    return ((yaml.safe_load(path.read_text()) or {}).get("stages") or {}).get(name, {})


def outs_hashes(root: str | Path, name: str) -> dict[str, str]:
    """``{out path: md5}`` of the stage as recorded in ``dvc.lock``."""
    return {o["path"]: o.get("md5", "") for o in lock_entry(root, name).get("outs", [])}


def remote_url(root: str | Path, remote: str | None = None) -> str | None:
    """The URL of ``remote`` (default: the default remote) from the DVC config, or None."""
    from dvc.config import Config

    try:
        conf = Config(dvc_dir=str(Path(root) / ".dvc"))
    except Exception as exc:  # noqa: BLE001 - a config we cannot read only costs the links
        log.debug("cannot read the DVC config in %s: %s", root, exc)
        return None
    name = remote or conf["core"].get("remote")
    return (conf["remote"].get(name) or {}).get("url") if name else None


def cache_object_url(base: str, md5: str) -> str:
    """Where DVC 3 stores an object with this hash under a remote ``base``."""
    digest = md5.removesuffix(".dir")
    suffix = ".dir" if md5.endswith(".dir") else ""
    return f"{base.rstrip('/')}/files/md5/{digest[:2]}/{digest[2:]}{suffix}"


# ------------------------------------------------------------------ lineage


def git_state(root: str | Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or None, "branch": git("rev-parse", "--abbrev-ref", "HEAD") or None,
            "dirty_files": [line[3:] for line in dirty.splitlines()]}


def lineage(root: str | Path) -> dict[str, Any]:
    """Git commit, the ``dvc.lock`` hashes of every stage's outputs and the params in force."""
    root = Path(root)
    params_file = root / "params.yaml"
    lock = root / "dvc.lock"
    return {
        "git": git_state(root),
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None,
        "outs": {name: outs_hashes(root, name) for name in dvc_yaml_stages(root)} if (root / "dvc.yaml").exists() else {},
        "params": (yaml.safe_load(params_file.read_text()) or {}) if params_file.exists() else {},
    }


# ------------------------------------------------------------------ tasks


@task(name="dvc-push", retries=3, retry_delay_seconds=[2, 10, 30])
def dvc_push(workdir: str = ".", remote: str | None = None, targets: list[str] | None = None,
             timeout_s: float = 3600) -> str:
    """Upload the cache of the workspace's outputs to a remote. Idempotent: safe to retry."""
    args = ["push", *(["-r", remote] if remote else []), *(targets or [])]
    return dvc(args, workdir, timeout_s)


@task(name="dvc-pull", retries=3, retry_delay_seconds=[2, 10, 30])
def dvc_pull(workdir: str = ".", remote: str | None = None, targets: list[str] | None = None,
             allow_missing: bool = True, timeout_s: float = 3600) -> str:
    """Fetch and check out outputs from a remote. Idempotent: safe to retry.

    ``allow_missing``: outputs the remote does not hold (never pushed) are left for ``repro`` to make.
    """
    args = ["pull", *(["-r", remote] if remote else []), *(["--allow-missing"] if allow_missing else []),
            *(targets or [])]
    return dvc(args, workdir, timeout_s)
