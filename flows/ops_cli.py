"""Operator commands: ``serve`` the Prefect deployments, ``promote`` a candidate or roll back.

Mounted on the ``drivevla`` command (``app.add_typer(ops_app)``); also runs alone:
``python -m flows.ops_cli serve`` / ``python -m flows.ops_cli promote --rollback``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Optional

import typer

from tasks.registry_tasks import DEFAULT_MODEL, MissingPackage, PromotionThresholds, RegistryError, S3Error

ops_app = typer.Typer(help="Serve deployments, promote and roll back models.", no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@ops_app.command()
def serve(workdir: Annotated[Optional[str], typer.Option(help="DVC workspace the runs use (default: cwd)")] = None,
          only: Annotated[Optional[list[str]], typer.Option("--only", help="serve only this deployment")] = None,
          prefect_yaml: Annotated[Optional[str], typer.Option(help="deployments file")] = None,
          limit: Annotated[Optional[int], typer.Option(help="at most this many runs at once")] = None) -> None:
    """Serve the deployments of prefect.yaml (pipeline on demand, retrain on its cron) until Ctrl-C."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    from flows.deployments import PREFECT_YAML, DeploymentConfigError
    from flows.deployments import serve as serve_deployments

    try:
        serve_deployments(prefect_yaml or PREFECT_YAML, workdir, only or None, limit)
    except DeploymentConfigError as exc:
        _fail(str(exc), 2)


@ops_app.command()
def promote(workdir: Annotated[str, typer.Option(help="the DVC workspace holding the candidate")] = ".",
            rollback: Annotated[bool, typer.Option("--rollback", help="return production to the previous version")] = False,
            model: Annotated[str, typer.Option(help="artifact name")] = DEFAULT_MODEL,
            bucket: Annotated[Optional[str], typer.Option(help="model bucket (default $DRIVEVLA_MODEL_BUCKET)")] = None,
            endpoint_url: Annotated[Optional[str], typer.Option(help="S3-compatible endpoint (default from env)")] = None,
            min_score_delta: Annotated[Optional[float], typer.Option(help="override min_driving_score_delta")] = None,
            max_parity_error: Annotated[Optional[float], typer.Option(help="override max_parity_error")] = None) -> None:
    """Promote the workspace's candidate if it beats production (exit 3 when rejected), or --rollback."""
    try:
        if rollback:
            from flows.promote import rollback as rollback_flow

            result = rollback_flow(workdir=workdir, model=model, bucket=bucket, endpoint_url=endpoint_url)
        else:
            from flows.promote import promote as promote_flow

            overrides = {k: v for k, v in {"min_driving_score_delta": min_score_delta,
                                           "max_parity_error": max_parity_error}.items() if v is not None}
            try:
                thresholds = PromotionThresholds(**overrides)
            except ValueError as exc:
                _fail(f"invalid promotion threshold: {exc}", 2)
            result = promote_flow(workdir=workdir, model=model, bucket=bucket, thresholds=thresholds,
                                  endpoint_url=endpoint_url)
    except (S3Error, RegistryError, MissingPackage) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result, indent=2, default=str))
    if not rollback and not result.get("promoted"):
        typer.secho("candidate rejected: " + "; ".join(result["decision"]["reasons"]), err=True)
        raise typer.Exit(3)


if __name__ == "__main__":
    sys.exit(ops_app())
