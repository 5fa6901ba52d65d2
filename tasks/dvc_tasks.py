"""DVC from Prefect: one lock for every DVC call, DVC's view of a stage as a cache key, push/pull
tasks with retries, and the lineage of a workspace (git commit, ``dvc.lock`` hashes, params).

DVC refuses concurrent use of a workspace ("Unable to acquire lock"), so every DVC call made here —
a ``dvc`` subprocess or the in-process ``dvc.repo.Repo`` used for cache keys — holds
:func:`dvc_lock` first. A pipeline run holds it once for the whole run (:func:`workspace_run`, from
writing ``params.yaml`` to its last stage), and its own DVC calls re-enter it. Two flows on one
workspace then wait for each other instead of failing or training with each other's params.
"""
from __future__ import annotations

import hashlib
import json
import logging
import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError

from infra.files import atomic_write_bytes, atomic_write_text
from infra.processes import alive
from infra.s3 import checksum_env
from stages.config import read_params
from tasks.dvc_project import DVC_YAML, load_dvc_lock, stage_names

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


# The workspaces whose lock this context (a flow run and the tasks it starts: Prefect copies the
# context into task threads) already holds through :func:`workspace_run`.
_HELD: ContextVar[frozenset[str]] = ContextVar("drivevla_workspace_locks", default=frozenset())


@contextmanager
def dvc_lock(root: str | Path, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the workspace's DVC lock (a file lock, so it also serialises separate processes).

    Inside :func:`workspace_run` for the same workspace the run already holds it: nothing to take.
    """
    key = str(Path(root).resolve())
    if key in _HELD.get():
        yield
        return
    lock = FileLock(str(lock_path(root)), timeout=timeout_s, thread_local=False)
    t0 = time.monotonic()
    try:
        lock.acquire()
    except Timeout:
        raise DvcLockTimeout(f"another DVC command or pipeline run has held {lock_path(root)} for over "
                             f"{timeout_s:.0f} s; wait for it or stop it") from None
    waited = time.monotonic() - t0
    if waited > 1:
        _logger().info("waited %.1f s for the workspace lock", waited)
    token = _HELD.set(_HELD.get() | {key})
    try:
        yield
    finally:
        _HELD.reset(token)
        lock.release()


def write_params(path: str | Path, text: str) -> None:
    """Write ``params.yaml`` in one rename: DVC or a stage reading it never sees half a file."""
    atomic_write_text(path, text)


@contextmanager
def workspace_run(root: str | Path, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """One pipeline run owns the workspace from writing ``params.yaml`` through its last stage.

    Holds the workspace lock for the whole block (the DVC calls inside do not take it again), so a
    second run waits instead of rewriting ``params.yaml`` under the first one. When the block fails
    (an error, Ctrl-C), ``params.yaml`` is put back as it was, atomically, so the overrides of a
    failed run do not linger and make stages look changed.
    """
    params = Path(root) / "params.yaml"
    with dvc_lock(root, timeout_s):
        before = params.read_bytes() if params.exists() else None
        try:
            yield
        except BaseException:
            if before is not None and (not params.exists() or params.read_bytes() != before):
                atomic_write_bytes(params, before)
                _logger().info("the run failed: params.yaml restored to what it was before the run")
            elif before is None and params.exists():
                params.unlink()
            raise


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
# After SIGTERM, how long the group gets to stop (DVC releases its lock, a stage finishes its write)
# before SIGKILL.
STOP_GRACE_S = 5.0
# The process groups started here and not yet stopped: killed at interpreter exit as a last resort
# (a run interrupted while a stage ran in a worker thread, whose `finally` never comes).
_LIVE_GROUPS: set[int] = set()


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop ``proc`` and every process of its group (DVC and the stage it runs): SIGTERM, then SIGKILL
    after ``grace_s``, then wait until none is left, so no stage outlives the run that started it."""
    pgid = proc.pid  # start_new_session: the child leads its own group

    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None and not alive(pgid, group=True):
                return True
            time.sleep(0.05)
        return False

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        if gone_within(wait_s):
            break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("process group %d did not stop after SIGKILL", pgid)
    _LIVE_GROUPS.discard(pgid)


def _stop_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


atexit.register(_stop_live_groups)


def run_streaming(cmd: list[str], cwd: str | Path, timeout_s: float | None = None,
                  logger: Any = None) -> str:
    """Run ``cmd``, logging its output line by line; stop it after ``timeout_s``.

    The command runs in its own process group (so a terminal's Ctrl-C reaches only this process,
    which then stops it in order). Whatever ends the wait — the time limit (Prefect's
    ``timeout_seconds`` cannot interrupt a synchronous task on the thread-pool runner), Ctrl-C,
    SIGTERM, an error — the whole group is stopped and waited for: DVC and the stage it runs both
    end, and DVC's own lock is released with them.
    """
    logger = logger or _logger()
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    _LIVE_GROUPS.add(proc.pid)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        stop_group(proc)

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
        if proc.poll() is None or alive(proc.pid, group=True):
            stop_group(proc)
        _LIVE_GROUPS.discard(proc.pid)
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


def stage_check(root: str | Path, name: str) -> tuple[dict[str, Any] | None, bool]:
    """DVC's view of stage ``name`` from one opening of the repository: what DVC would record for its
    inputs if it ran now (its command, the hashes of its deps — computed by DVC through its state
    cache — and the values of its params; None when a dep does not exist), and whether its outputs
    are present and unmodified.

    For an up-to-date stage the inputs equal its ``dvc.lock`` entry minus ``outs``.
    """
    from dvc.repo import Repo
    from dvc.stage.serialize import to_single_stage_lockfile

    with dvc_lock(root):
        with Repo(str(root)) as repo, repo.lock:
            stage = repo.stage.load_one(path=str(Path(root).resolve() / DVC_YAML), name=name)
            outs_ok = not stage.changed_outs(allow_missing=False)
            try:
                stage.save_deps()
            except Exception as exc:  # a dep that does not exist yet: nothing to key on
                log.info("stage %s: cannot hash its deps yet (%s); it will run", name, exc)
                return None, outs_ok
            entry = to_single_stage_lockfile(stage)
    return {k: entry.get(k) for k in ("cmd", "deps", "params")}, outs_ok


def stage_inputs(root: str | Path, name: str, check_outs: bool = True) -> dict[str, Any] | None:
    """The inputs of :func:`stage_check`; with ``check_outs`` None also when an output is missing or
    was modified."""
    inputs, outs_ok = stage_check(root, name)
    return None if check_outs and not outs_ok else inputs


def inputs_key(root: str | Path, name: str, inputs: dict[str, Any] | None) -> str | None:
    """The cache key of a stage whose inputs are ``inputs`` (see :func:`stage_view_key`)."""
    if inputs is None:
        return None
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    # The workspace path is part of the key: two clones share no outputs on disk.
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"drivevla-stage-{name}-{where}-{digest}"


def stage_view_key(root: str | Path, name: str) -> str | None:
    """A cache key for stage ``name`` in ``root``: DVC's view of its inputs, not the run id.

    The key names the inputs only, so a run that has to make the outputs (first run, outputs
    deleted) stores its result under the key the next unchanged run will compute. Whether the
    outputs on disk still match is checked separately (``tasks.stage_tasks.stage_state``), and the
    flow refreshes the entry when they do not.
    """
    return inputs_key(root, name, stage_inputs(root, name, check_outs=False))


def lock_entry(root: str | Path, name: str) -> dict[str, Any]:
    return load_dvc_lock(root).get(name, {})


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
        "outs": {name: outs_hashes(root, name) for name in stage_names(root)},
        "params": read_params(params_file),
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
