"""The deployments of ``prefect.yaml`` served from one process with ``flow.serve``.

``prefect.yaml`` is the single description of the deployments (names, parameters, cron schedules);
``prefect deploy --all`` registers them on a work pool, and :func:`serve` (``drivevla serve``) serves
the same ones without a work pool or worker. Served runs execute in the serving process's working
directory unless a ``workdir`` parameter says otherwise.

    python -m flows.deployments [--workdir DIR] [--only pipeline] [--limit N]
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cron: str
    timezone: str = "UTC"
    active: bool = True


class DeploymentSpec(BaseModel):
    """One entry of ``prefect.yaml``'s ``deployments`` list (the fields ``serve`` uses)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    entrypoint: str = Field(description="path/to/file.py:flow_function")
    description: str = ""
    tags: list[str] = []
    parameters: dict[str, Any] = {}
    schedules: list[ScheduleSpec] = []

    @property
    def flow_module(self) -> str:
        path, _, _ = self.entrypoint.partition(":")
        return path.removesuffix(".py").replace("/", ".")


class DeploymentConfigError(ValueError):
    """``prefect.yaml`` is missing, malformed, or names an unknown deployment."""


def load_specs(path: str | Path = PREFECT_YAML, only: list[str] | None = None) -> list[DeploymentSpec]:
    path = Path(path)
    if not path.exists():
        raise DeploymentConfigError(f"{path} not found: run from the project root or pass --prefect-yaml")
    data = yaml.safe_load(path.read_text()) or {}
    specs = [DeploymentSpec.model_validate(d) for d in data.get("deployments") or []]
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise DeploymentConfigError(f"unknown deployment(s) {unknown}; {path} has {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in only]
    return specs


def spec_by_name(name: str, path: str | Path = PREFECT_YAML) -> DeploymentSpec:
    return load_specs(path, only=[name])[0]


def load_flow(spec: DeploymentSpec):
    module = importlib.import_module(spec.flow_module)
    return getattr(module, spec.entrypoint.partition(":")[2])


def build_deployments(specs: list[DeploymentSpec], workdir: str | None = None) -> list[Any]:
    """``RunnerDeployment`` objects for ``specs``; ``workdir`` overrides each one's ``workdir`` parameter."""
    from prefect.schedules import Cron

    deployments = []
    for spec in specs:
        params = dict(spec.parameters)
        if workdir is not None:
            params["workdir"] = str(Path(workdir).resolve())
        schedules = [Cron(s.cron, timezone=s.timezone, active=s.active) for s in spec.schedules]
        deployments.append(load_flow(spec).to_deployment(
            name=spec.name, description=spec.description or None, tags=spec.tags or None,
            parameters=params, schedules=schedules or None))
    return deployments


def serve(prefect_yaml: str | Path = PREFECT_YAML, workdir: str | None = None, only: list[str] | None = None,
          limit: int | None = None) -> None:
    """Serve the deployments until interrupted (Ctrl-C pauses their schedules on the way out)."""
    from prefect import serve as prefect_serve

    deployments = build_deployments(load_specs(prefect_yaml, only), workdir)
    prefect_serve(*deployments, limit=limit)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__.splitlines()[0])
    parser.add_argument("--prefect-yaml", default=str(PREFECT_YAML))
    parser.add_argument("--workdir", default=None, help="the DVC workspace the runs use (default: each deployment's)")
    parser.add_argument("--only", action="append", default=None, help="serve only this deployment (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many runs at once")
    args = parser.parse_args()
    try:
        serve(args.prefect_yaml, args.workdir, args.only, args.limit)
    except DeploymentConfigError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
