"""Gated promotion of a candidate model, and rollback.

``promote``: refuse outputs that differ from ``dvc.lock`` (edited by hand); compare the candidate's
evaluation metrics and export parity with production's (the thresholds are
:class:`infra.promotion.PromotionThresholds`, the config's ``promote:`` section); if it passes, commit the lineage
(``dvc.lock``, params, metrics), register the commit as a GTO version, upload the exported files and
the model card to ``s3://<bucket>/<model>/<version>/``, move the ``prod`` pointer (the last S3 write),
then assign the GTO ``prod`` stage. A rejected candidate leaves production untouched and says why.

Failure anywhere before the pointer moves leaves production on the old version (the uploaded files
of the new one are unreferenced, and a retry reuses its version and completes them). A version that
is already published is never rewritten: publishing it again with other content fails. If the GTO
assignment fails after the pointer moved, the pointer is put back, so S3 and git agree.

``rollback``: point production at the version before the current one (S3 pointer and GTO stage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.registry_tasks import (DEFAULT_MODEL, PromotionThresholds, RegistryError, assign_prod, build_card, judge,
                                  move_prod_pointer, read_candidate, read_pointer, read_production,
                                  register_candidate, restore_prod_pointer, rollback_prod_pointer, s3_preflight,
                                  upload_version, verify_outputs)

__all__ = ["promote", "rollback", "PromotionThresholds"]


def thresholds_from_config(workdir: str) -> PromotionThresholds:
    """The ``promote:`` section of the workspace's config when the config has one, else the defaults."""
    from stages.config import load_config

    section = getattr(load_config(Path(workdir) / "params.yaml"), "promote", None)
    return section if isinstance(section, PromotionThresholds) else PromotionThresholds()


def _decision_markdown(model: str, decision: Any, candidate: dict[str, Any], production: dict[str, Any] | None,
                       outcome: str) -> str:
    lines = [f"## {model}: {outcome}", "", f"production before: `{production['version'] if production else None}`",
             "", "| check | passed | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {'yes' if c.passed else 'NO'} | {c.detail} |" for c in decision.checks]
    keys = sorted(set(candidate) | set((production or {}).get("metrics", {})))
    lines += ["", "| metric | candidate | production |", "|---|---|---|"]
    for k in keys:
        lines.append(f"| {k} | {candidate.get(k, '')} | {(production or {}).get('metrics', {}).get(k, '')} |")
    return "\n".join(lines) + "\n"


@flow(name="drivevla-promote", log_prints=True)
def promote(workdir: str = ".", model: str = DEFAULT_MODEL, bucket: str | None = None,
            thresholds: PromotionThresholds | None = None, endpoint_url: str | None = None) -> dict[str, Any]:
    """Promote the workspace's candidate if it beats production; return the decision.

    thresholds: default from the config's ``promote:`` section, else ``PromotionThresholds()``.
    bucket: the model bucket (default ``$DRIVEVLA_MODEL_BUCKET``). endpoint_url: an S3-compatible
    endpoint (default from the environment, e.g. ``AWS_ENDPOINT_URL_S3``).
    """
    logger = get_run_logger()
    thresholds = thresholds or thresholds_from_config(workdir)
    # What is published must be what the pipeline made: hand-edited outputs promote nothing.
    verify_outputs(workdir)
    # Reach S3 before anything is registered: a wrong endpoint or key must promote nothing.
    bucket = s3_preflight(bucket, model, endpoint_url)
    candidate = read_candidate(workdir)
    production = read_production(bucket, model, endpoint_url)
    decision = judge(candidate, production["metrics"] if production else None, thresholds)
    result: dict[str, Any] = {"model": model, "promoted": False, "decision": decision.to_dict(),
                              "candidate": candidate, "production_before": production["version"] if production else None}
    if not decision.accepted:
        logger.warning("candidate rejected, production stays %s: %s", result["production_before"],
                       "; ".join(decision.reasons))
        result["production"] = result["production_before"]
        create_markdown_artifact(key="promotion", markdown=_decision_markdown(model, decision, candidate, production,
                                                                              "candidate rejected"),
                                 description="drivevla promotion decision")
        return result

    reg = register_candidate(workdir, model)
    version = reg["version"]
    if version == result["production_before"]:
        raise RegistryError(f"the candidate's commit {reg['commit'][:8]} is already {model}@{version}, the production "
                            "version: nothing new to promote. Re-run the pipeline on new data or code to make a "
                            "new candidate")
    card = build_card(workdir, model, candidate, decision.to_dict(), production)
    manifest = upload_version(workdir, version, card, bucket, model, endpoint_url)
    previous = read_pointer(bucket, model, endpoint_url)
    pointer = move_prod_pointer(version, bucket, model, endpoint_url, git_commit=reg["commit"])
    try:
        assign_prod(workdir, version, model)
    except Exception:
        # Keep S3 and the git registry in agreement: production goes back to what it was.
        logger.error("GTO assignment failed after the pointer moved; restoring the pointer to %s",
                     previous["version"] if previous else None)
        restore_prod_pointer(previous, bucket, model, endpoint_url)
        raise
    logger.info("promoted %s@%s (was %s): %s", model, version, result["production_before"], decision.summary())
    result.update(promoted=True, version=version, production=version, commit=reg["commit"],
                  url=f"s3://{bucket}/{model}/{version}/", files=sorted(manifest["files"]), pointer=pointer)
    create_markdown_artifact(key="promotion", markdown=_decision_markdown(model, decision, candidate, production,
                                                                          f"promoted {version}")
                             + f"\npublished: `{result['url']}`\n",
                             description="drivevla promotion decision")
    return result


@flow(name="drivevla-rollback", log_prints=True)
def rollback(workdir: str = ".", model: str = DEFAULT_MODEL, bucket: str | None = None,
             endpoint_url: str | None = None) -> dict[str, Any]:
    """Return production to the version before the current one (S3 pointer, then the GTO stage)."""
    bucket = s3_preflight(bucket, model, endpoint_url)
    moved = rollback_prod_pointer(bucket, model, endpoint_url)
    try:
        assign_prod(workdir, moved["to"], model, message=f"rollback {model} from {moved['from']} to {moved['to']}")
    except Exception:
        restore_prod_pointer({"version": moved["from"], "history": moved["pointer"]["history"] + [moved["to"]],
                              "updated_at": moved["pointer"]["updated_at"], "git_commit": None},
                             bucket, model, endpoint_url)
        raise
    get_run_logger().info("rolled %s back from %s to %s", model, moved["from"], moved["to"])
    create_markdown_artifact(key="promotion", markdown=f"## {model}: rolled back from `{moved['from']}` to "
                                                       f"`{moved['to']}`\n", description="drivevla rollback")
    return {"model": model, "from": moved["from"], "to": moved["to"], "production": moved["to"]}
