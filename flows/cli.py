"""The ``drivevla`` command: run the pipeline, one stage, or show the configuration."""
from __future__ import annotations

import os

# Before anything imports prefect (its settings are read once, at import). On an empty PREFECT_HOME
# the ephemeral API server's first start creates and migrates its database: ~22 s on two busy
# cores, past Prefect's default wait of 20 s ("Timed out while attempting to connect to ephemeral
# Prefect API server"). Later starts take a few seconds; the user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
# The ephemeral API's telemetry service races the first flow run for SQLite's write lock and
# logs a "database is locked" traceback; it sends nothing from here anyway.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from stages import STAGE_ORDER  # noqa: E402
from stages.common import StageInputError  # noqa: E402
from stages.config import ConfigError, dump_config, load_config  # noqa: E402
from tasks.dvc_project import DvcFileError  # noqa: E402

app = typer.Typer(help="drivevla: train a driving vision-language-action model, stage by stage.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _mount_subcommands() -> None:
    from flows.carla_cli import carla_app

    from flows.ops_cli import ops_app
    from flows.predict_cli import predict as predict_command

    app.add_typer(carla_app, name="carla")
    app.add_typer(ops_app)  # drivevla serve / drivevla promote [--rollback]
    app.command("predict")(predict_command)  # onnxruntime only: no torch needed

PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="smoke | demo | carla (default: params.yaml's)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a value: --set online.total_timesteps=8192")]
ParamsOpt = Annotated[str, typer.Option("--params", help="params file")]


def _sigterm_as_interrupt() -> None:
    """SIGTERM (``kill``, a CI runner stopping a job) unwinds like Ctrl-C, so the running stage's
    process group is stopped and params.yaml restored instead of the process vanishing mid-stage."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def pipeline(preset: PresetOpt = None, set_: SetOpt = None,
             stage: Annotated[Optional[list[str]], typer.Option("--stage", help="run only these stages")] = None,
             no_dvc: Annotated[bool, typer.Option("--no-dvc", help="call the stages directly, without DVC")] = False) -> None:
    """Run the pipeline through the Prefect flow (data → pretrain → offline → online → evaluate → export)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:  # a bad params.yaml or --set fails here, in a second, before Prefect starts
        load_config("params.yaml", preset=preset, overrides=set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    from flows.pipeline import pipeline as pipeline_flow

    _sigterm_as_interrupt()
    try:
        results = pipeline_flow(preset=preset, overrides=set_ or [], stages=stage or None,
                                use_dvc=False if no_dvc else None)
    except (ConfigError, DvcFileError) as exc:
        _fail(str(exc))
    except StageInputError as exc:
        _fail(str(exc), code=1)
    typer.echo(json.dumps(results, indent=2, default=str))


@app.command("stage")
def stage_cmd(name: Annotated[str, typer.Argument(help=f"one of {', '.join(STAGE_ORDER)}")],
              preset: PresetOpt = None, set_: SetOpt = None, params: ParamsOpt = "params.yaml") -> None:
    """Run a single stage directly (no Prefect, no DVC)."""
    if name not in STAGE_ORDER:
        _fail(f"unknown stage {name!r}; the stages are {', '.join(STAGE_ORDER)}")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    from stages.common import setup_logging
    from tasks.stage_tasks import stage_module

    try:
        cfg = load_config(params, preset=preset, overrides=set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    setup_logging()
    result = stage_module(name).run(cfg)
    typer.echo(json.dumps(result, indent=2, default=str))


@config_app.command("show")
def config_show(preset: PresetOpt = None, set_: SetOpt = None, params: ParamsOpt = "params.yaml") -> None:
    """Print the merged, validated configuration."""
    try:
        cfg = load_config(params, preset=preset, overrides=set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(dump_config(cfg))


_mount_subcommands()


def main() -> None:
    app(prog_name="drivevla")


if __name__ == "__main__":
    sys.exit(main())
