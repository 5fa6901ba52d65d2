"""The offline stage's held-out evaluation: the open-loop report per source (the model beside a
constant-velocity and an ego-status baseline) and how the value function ranks clean expert states
against perturbed ones."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.data.shards import SplitArrays
from stages.metrics.open_loop import constant_velocity, open_loop_report
from stages.training import TokenCache


@torch.no_grad()
def predict(model, s: SplitArrays, tokens: TokenCache, device: str, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Planned trajectories ``[N, T, 2]`` and values ``[N]`` of every sample of ``s``."""
    model.eval()
    trajs, values = [], []
    for i in range(0, len(s), batch_size):
        sl = slice(i, i + batch_size)
        out = model(torch.from_numpy(s.images[sl]).to(device), torch.from_numpy(s.states[sl]).to(device),
                    tokens([str(c) for c in s.commands[sl]], device))
        trajs.append(out.trajectory.cpu().numpy())
        values.append(out.value.cpu().numpy())
    return np.concatenate(trajs), np.concatenate(values)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half (Mann-Whitney U)."""
    if not len(positive) or not len(negative):
        return float("nan")
    scores = np.concatenate([positive, negative])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):       # average ranks of ties
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def value_ranking(values: np.ndarray, s: SplitArrays) -> dict[str, float]:
    """Mean V of clean vs perturbed simulator states, and the AUC of V separating them."""
    sim = s.action_valid
    clean, pert = values[sim & ~s.perturbed], values[sim & s.perturbed]
    return {"value_clean_mean": float(clean.mean()) if len(clean) else float("nan"),
            "value_perturbed_mean": float(pert.mean()) if len(pert) else float("nan"),
            "value_auc_clean_vs_perturbed": auc(clean, pert)}


def evaluate(model, val: SplitArrays, train_baseline: dict[str, Any], tokens: TokenCache, device: str,
             step_seconds: float, ego_size: dict[str, list[float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Open-loop report per source on clean, valid held-out samples, and the value ranking."""
    pred, values = predict(model, val, tokens, device)
    reports: dict[str, Any] = {}
    for source in sorted(set(val.source.tolist())):
        mask = (val.source == source) & val.traj_valid & ~val.perturbed
        if not mask.any():
            continue
        part = val.select(mask)
        planners = {
            "model": pred[mask],
            "const_velocity": constant_velocity(part.states[:, 0], pred.shape[1], step_seconds),
            "ego_mlp": train_baseline["ego_mlp"].predict(part.states, part.commands),
        }
        reports[source] = open_loop_report(planners, part.trajectories, part.agent_boxes, part.agent_offsets,
                                           step_seconds, tuple(ego_size[source]))
    return reports, value_ranking(values, val)
