"""``drivevla carla up | down | status | logs``: CARLA servers in Docker from the command line — the
seed's ``docker run -d … carlasim/carla`` / ``docker stop`` / ``docker logs``, with free ports, a
readiness probe instead of ``sleep 30``, labels, and cleanup that never touches other containers.
``servers-needed`` prints how many servers the online stage needs (one per env).

Settings come from the ``carla:`` section of ``params.yaml`` (see `infra.carla.CarlaServerConfig`, reached through `tasks.carla_servers`),
then ``--set key=value`` (keys of that section), then the flags.
"""
from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from stages.config import ConfigError, deep_merge, load_config, parse_override
from stages.envs.slots import OnlineEnvSlots
from tasks.carla_servers import (ENV_VAR, LABEL_DETACHED, LABEL_FLOW_RUN_NAME, LABEL_GPU, LABEL_PORTS, LABEL_SESSION,
                                 CarlaServerConfig, CarlaServerError, CarlaServerManager, ServerEvent, connect_docker,
                                 endpoints_to_env, managed_containers, reap_orphans)

carla_app = typer.Typer(help="Run CARLA servers in Docker (start, stop, inspect, read logs).",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[str, typer.Option("--params", help="params file whose `carla:` section is read")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a carla setting: --set tag=0.9.15")]
OwnerOpt = Annotated[Optional[str], typer.Option("--owner", help="owner label (default: the config's)")]


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _section(params: str) -> dict[str, Any]:
    """The validated ``carla:`` section of the pipeline config (presets applied)."""
    try:
        return load_config(params).carla.model_dump()
    except ConfigError as exc:
        _fail(str(exc), 2)
    raise AssertionError("unreachable")


def load_carla_config(params: str = "params.yaml", sets: list[str] | None = None, **flags: Any) -> CarlaServerConfig:
    """params.yaml's carla section, then ``--set`` overrides, then the flags that were given."""
    raw = _section(params)
    try:
        for text in sets or []:
            raw = deep_merge(raw, parse_override(text.removeprefix("carla.")))
    except ConfigError as exc:
        _fail(str(exc), 2)
    raw.update({k: v for k, v in flags.items() if v is not None})
    try:
        return CarlaServerConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  - carla.{'.'.join(map(str, e['loc'])) or '(root)'} = {e.get('input')!r}: {e['msg']}"
                 for e in exc.errors()]
        _fail("invalid carla configuration:\n" + "\n".join(lines), 2)
    raise AssertionError("unreachable")


def _client(config: CarlaServerConfig | None = None, docker_host: str | None = None) -> Any:
    try:
        return connect_docker(docker_host or (config.docker_host if config else None))
    except (CarlaServerError, ImportError) as exc:
        _fail(str(exc))


def _print_event(event: ServerEvent) -> None:
    typer.echo(f"{event.name}: {event.kind} {event.message}", err=True)


@carla_app.command()
def up(servers: Annotated[Optional[int], typer.Option("--servers", "-n", help="how many servers")] = None,
       tag: Annotated[Optional[str], typer.Option(help="image tag (the client's version)")] = None,
       image: Annotated[Optional[str], typer.Option(help="image repository")] = None,
       gpus: Annotated[Optional[str], typer.Option(help="GPU ids, comma-separated: 0,1")] = None,
       port: Annotated[Optional[int], typer.Option(help="first rpc port tried (free ports are searched from it)")] = None,
       quality_level: Annotated[Optional[str], typer.Option(help="Low | Epic")] = None,
       fps: Annotated[Optional[int], typer.Option(help="-fps=N")] = None,
       ready_timeout: Annotated[Optional[float], typer.Option(help="seconds to wait for readiness")] = None,
       network: Annotated[Optional[str], typer.Option(help="host | bridge")] = None,
       fmt: Annotated[str, typer.Option("--format", help="table | json | env (shell `export` lines)")] = "table",
       params: ParamsOpt = "params.yaml", set_: SetOpt = None) -> None:
    """Start CARLA servers and wait until each answers its version; they keep running (until `down`)."""
    if fmt not in ("table", "json", "env"):
        _fail(f"--format {fmt!r}: use table, json or env", 2)
    config = load_carla_config(
        params, set_, num_servers=servers, tag=tag, image=image, base_port=port, quality_level=quality_level,
        fps=fps, ready_timeout_s=ready_timeout, network_mode=network,
        gpus=[g.strip() for g in gpus.split(",") if g.strip()] if gpus is not None else None)
    # Deferred: tasks.carla_resource loads Prefect (seconds), which no other carla command needs.
    from tasks.carla_resource import bridge_version_probe

    manager = CarlaServerManager(config, version_probe=bridge_version_probe(), on_event=_print_event,
                                 client=_client(config), detached=True)
    try:
        endpoints = manager.start()
    except (CarlaServerError, ImportError) as exc:
        _fail(str(exc))
    if fmt == "json":
        typer.echo(json.dumps({"session": manager.session, "servers": [e.to_dict() for e in endpoints]}, indent=2))
    elif fmt == "env":
        first = endpoints[0]
        for key, value in ((ENV_VAR, endpoints_to_env(endpoints)), ("DRIVEVLA_CARLA_SESSION", manager.session),
                           ("CARLA_HOST", first.host), ("CARLA_PORT", first.port), ("CARLA_TM_PORT", first.tm_port)):
            typer.echo(f"export {key}={shlex.quote(str(value))}")
    else:
        for e in endpoints:
            typer.echo(f"{e.name}  {e.host}:{e.port}  streaming {e.streaming_port}  tm {e.tm_port}  "
                       f"gpu {e.gpu or '-'}  version {e.version or '?'}")
        typer.echo(f"session {manager.session}: stop with `drivevla carla down --session {manager.session}`")


@carla_app.command("servers-needed")
def servers_needed(
        params: ParamsOpt = "params.yaml",
        preset: Annotated[Optional[str], typer.Option(help="smoke | demo | carla (default: params.yaml's)")] = None,
        set_: Annotated[Optional[list[str]], typer.Option(
            "--set", help="override a pipeline value, as the stage's --set: online.ppo.num_envs=2")] = None,
        world_size: Annotated[int, typer.Option(min=1, help="torchrun ranks of the online stage")] = 1) -> None:
    """Print how many servers the online stage needs: one per env, num_envs x world size + 1 (eval)."""
    try:
        cfg = load_config(params, preset=preset, overrides=set_ or [])
    except ConfigError as exc:
        _fail(str(exc), 2)
    typer.echo(OnlineEnvSlots.for_config(cfg.online, world_size).total)


@carla_app.command()
def down(session: Annotated[Optional[str], typer.Option(help="only the servers of this `up`")] = None,
         all_: Annotated[bool, typer.Option("--all", help="also servers of running flows (not only `up`'s)")] = False,
         owner: OwnerOpt = None, params: ParamsOpt = "params.yaml", set_: SetOpt = None) -> None:
    """Stop and remove servers started by `up` (and orphans of crashed runs). Never touches containers
    without drivevla's labels."""
    config = load_carla_config(params, set_, owner=owner)
    client = _client(config)
    if session is not None and not session.strip():
        _fail("--session is empty (did `up` fail?); nothing removed", 2)
    labels = {LABEL_SESSION: session} if session else ({} if all_ else {LABEL_DETACHED: "true"})
    removed = []
    for container in managed_containers(client, config.owner, **labels):
        container.remove(force=True)
        removed.append(container.name)
    if not session:
        removed += reap_orphans(client, config.owner)
    typer.echo("\n".join(f"removed {name}" for name in removed) if removed else "no servers to remove")


def _age(created: str) -> str:
    try:
        start = datetime.fromisoformat(created[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return "?"
    seconds = int((datetime.now(timezone.utc) - start).total_seconds())
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@carla_app.command()
def status(owner: OwnerOpt = None, all_owners: Annotated[bool, typer.Option("--all-owners")] = False,
           fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
           params: ParamsOpt = "params.yaml", set_: SetOpt = None) -> None:
    """List drivevla's CARLA containers: state, ports, GPU, who started them."""
    config = load_carla_config(params, set_, owner=owner)
    client = _client(config)
    rows = []
    for c in managed_containers(client, None if all_owners else config.owner):
        labels = c.labels
        rows.append({"name": c.name, "status": c.status, "ports": labels.get(LABEL_PORTS, ""),
                     "gpu": labels.get(LABEL_GPU) or "-", "session": labels.get(LABEL_SESSION, ""),
                     "started_by": "up" if labels.get(LABEL_DETACHED) == "true"
                     else (labels.get(LABEL_FLOW_RUN_NAME) or f"pid {labels.get('drivevla.pid', '?')}"),
                     "age": _age(c.attrs.get("Created", ""))})
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no CARLA servers")
        return
    cols = ["name", "status", "ports", "gpu", "session", "started_by", "age"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in cols}
    typer.echo("  ".join(k.upper().ljust(widths[k]) for k in cols))
    for r in rows:
        typer.echo("  ".join(str(r[k]).ljust(widths[k]) for k in cols))


@carla_app.command()
def logs(name: Annotated[Optional[str], typer.Argument(help="container name (or a unique prefix); default: all")] = None,
         tail: Annotated[int, typer.Option(help="lines from the end")] = 100,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
         owner: OwnerOpt = None, params: ParamsOpt = "params.yaml", set_: SetOpt = None) -> None:
    """Print a server's logs (the seed's `docker logs carla-server`)."""
    config = load_carla_config(params, set_, owner=owner)
    containers = managed_containers(_client(config), config.owner)
    if name:
        containers = [c for c in containers if c.name == name] or [c for c in containers if c.name.startswith(name)]
    if not containers:
        _fail(f"no CARLA server{' named ' + repr(name) if name else ''} (see `drivevla carla status`)")
    if follow:
        if len(containers) > 1:
            _fail("--follow needs one server: name it (see `drivevla carla status`)", 2)
        try:
            for chunk in containers[0].logs(stream=True, follow=True, tail=tail):
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        return
    for c in containers:
        if len(containers) > 1:
            typer.echo(f"==> {c.name} <==")
        typer.echo(c.logs(tail=tail).decode("utf-8", "replace").rstrip())


if __name__ == "__main__":
    carla_app(prog_name="drivevla carla")
