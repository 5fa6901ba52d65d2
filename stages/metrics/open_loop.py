"""Open-loop planning metrics on a held-out split, with the two usual baselines beside them.

Trajectories are ``[N, T, 2]`` waypoints in the ego frame (x forward, y left) at ``step_seconds``,
2 * step_seconds, ...; every metric is taken on nuScenes' 2 Hz grid (0.5, 1.0, ... s), the predictions
and ground truth linearly interpolated there from the origin at t = 0 (exact when the grids agree).

- L2 at 1 / 2 / 3 s in both conventions of the literature:
  ``at``: the L2 error of the waypoint at t (UniAD);
  ``avg``: the mean L2 error of the 2 Hz waypoints up to t (ST-P3 / VAD).
- Collision rate: the ego box placed at the planned waypoint at time t (heading along the planned
  path) against the annotated boxes of the other agents at t (oriented-box overlap test, separating
  axes); per time as the share of samples that collide, again ``at`` t and ``avg`` up to t.
- Baselines computed on the same samples: constant velocity (straight on at the current speed) and an
  ego-status-only MLP (AD-MLP-style: state vector + command -> trajectory) trained on the train split.

`plot_open_loop` draws the figure (matplotlib, Agg backend).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.common import save_figure

log = logging.getLogger(__name__)

EVAL_EVERY = 0.5                 # s: nuScenes' keyframe grid
REPORT_SECONDS = (1.0, 2.0, 3.0)


# -- trajectories on the evaluation grid ---------------------------------------------------------

def eval_times(horizon_seconds: float) -> np.ndarray:
    return EVAL_EVERY * np.arange(1, int(round(horizon_seconds / EVAL_EVERY + 1e-6)) + 1)


def interpolate_at(traj: np.ndarray, step_seconds: float, times: np.ndarray) -> np.ndarray:
    """``[N, T, 2]`` waypoints at ``step_seconds * (1..T)`` -> ``[N, len(times), 2]`` (origin at t = 0)."""
    traj = np.asarray(traj, dtype=np.float64)
    n, t_len, _ = traj.shape
    full = np.concatenate([np.zeros((n, 1, 2)), traj], axis=1)
    pos = np.clip(np.asarray(times) / step_seconds, 0, t_len)
    lo = np.minimum(np.floor(pos).astype(int), t_len - 1)
    frac = (pos - lo)[None, :, None]
    return full[:, lo] * (1 - frac) + full[:, lo + 1] * frac


def headings_at(traj: np.ndarray, step_seconds: float, times: np.ndarray) -> np.ndarray:
    """Heading of the planned path at ``times``: the direction of travel around each time (0 when standing)."""
    eps = 0.5 * step_seconds
    ahead = interpolate_at(traj, step_seconds, np.asarray(times) + eps)
    behind = interpolate_at(traj, step_seconds, np.maximum(np.asarray(times) - eps, 0.0))
    d = ahead - behind
    moving = np.linalg.norm(d, axis=-1) > 1e-3
    return np.where(moving, np.arctan2(d[..., 1], d[..., 0]), 0.0)


def l2_errors(pred: np.ndarray, truth: np.ndarray, step_seconds: float, horizon_seconds: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample L2 error ``[N, K]`` at the 2 Hz times, and the times ``[K]``."""
    times = eval_times(horizon_seconds)
    err = np.linalg.norm(interpolate_at(pred, step_seconds, times) - interpolate_at(truth, step_seconds, times), axis=-1)
    return err, times


def _summarise(per_time: np.ndarray, times: np.ndarray, name: str, seconds: Sequence[float]) -> dict[str, float]:
    """``per_time [K]`` (already averaged over samples) -> ``{name}_at_Ns`` and ``{name}_avg_Ns``."""
    out = {}
    for s in seconds:
        upto = times <= s + 1e-6
        if not upto.any() or times[upto][-1] < s - 1e-6:
            continue   # the horizon does not reach s
        out[f"{name}_at_{s:g}s"] = float(per_time[upto][-1])
        out[f"{name}_avg_{s:g}s"] = float(per_time[upto].mean())
    return out


# -- collisions -------------------------------------------------------------------------------------

def _corners(x: np.ndarray, y: np.ndarray, yaw: np.ndarray, length: np.ndarray, width: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    dx = np.array([0.5, 0.5, -0.5, -0.5])[None] * length[:, None]
    dy = np.array([0.5, -0.5, -0.5, 0.5])[None] * width[:, None]
    return np.stack([x[:, None] + c[:, None] * dx - s[:, None] * dy,
                     y[:, None] + s[:, None] * dx + c[:, None] * dy], axis=-1)   # [M, 4, 2]


def boxes_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Oriented boxes ``[M, 5]`` (x, y, yaw, length, width) pairwise by row -> bool ``[M]`` (separating axes)."""
    ca = _corners(*a.T)
    cb = _corners(*b.T)
    hit = np.ones(len(a), dtype=bool)
    for yaw in (a[:, 2], a[:, 2] + np.pi / 2, b[:, 2], b[:, 2] + np.pi / 2):
        axis = np.stack([np.cos(yaw), np.sin(yaw)], axis=-1)[:, None, :]
        pa, pb = (ca * axis).sum(-1), (cb * axis).sum(-1)
        hit &= (pa.max(1) >= pb.min(1)) & (pb.max(1) >= pa.min(1))
    return hit


def collisions(pred: np.ndarray, agent_boxes: np.ndarray, agent_offsets: np.ndarray, step_seconds: float,
               horizon_seconds: float, ego_size: tuple[float, float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample collision flags ``[N, K]`` at the 2 Hz times, and the times.

    ``agent_boxes`` rows ``(t, x, y, yaw, length, width)`` in each sample's ego frame, sample i owning rows
    ``agent_offsets[i]:agent_offsets[i+1]``; ``ego_size`` (length, width), or one per sample ``[N, 2]``.
    """
    times = eval_times(horizon_seconds)
    n = len(pred)
    hits = np.zeros((n, len(times)), dtype=bool)
    if len(agent_boxes) == 0:
        return hits, times
    pos = interpolate_at(pred, step_seconds, times)
    head = headings_at(pred, step_seconds, times)
    owner = np.repeat(np.arange(n), np.diff(agent_offsets))
    k = np.rint(agent_boxes[:, 0] / EVAL_EVERY).astype(int) - 1
    keep = (k >= 0) & (k < len(times)) & (np.abs(agent_boxes[:, 0] - times[np.clip(k, 0, len(times) - 1)]) < 0.05)
    owner, k, boxes = owner[keep], k[keep], agent_boxes[keep]
    size = np.broadcast_to(np.asarray(ego_size, dtype=np.float64), (n, 2))
    ego = np.column_stack([pos[owner, k, 0], pos[owner, k, 1], head[owner, k], size[owner, 0], size[owner, 1]])
    hit = boxes_overlap(ego, boxes[:, 1:6].astype(np.float64))
    np.logical_or.at(hits, (owner[hit], k[hit]), True)
    return hits, times


# -- baselines ----------------------------------------------------------------------------------------

def constant_velocity(speed: np.ndarray, horizon: int, step_seconds: float) -> np.ndarray:
    """Straight on at the current speed: ``[N, horizon, 2]``."""
    t = step_seconds * np.arange(1, horizon + 1, dtype=np.float32)
    traj = np.zeros((len(speed), horizon, 2), dtype=np.float32)
    traj[:, :, 0] = np.asarray(speed, dtype=np.float32)[:, None] * t[None]
    return traj


class EgoStatusMLP(nn.Module):
    """AD-MLP-style planner from ego status alone: state vector + command (one-hot) -> waypoints."""

    def __init__(self, state_dim: int, commands: Sequence[str], horizon: int, hidden: int = 256):
        super().__init__()
        self.commands = list(commands)
        self.horizon = horizon
        self.register_buffer("mean", torch.zeros(state_dim))
        self.register_buffer("std", torch.ones(state_dim))
        self.register_buffer("traj_scale", torch.ones(horizon, 2))
        self.net = nn.Sequential(nn.Linear(state_dim + len(self.commands) + 1, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, horizon * 2))

    def encode(self, states: np.ndarray, commands: Sequence[str]) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.commands)}
        onehot = np.zeros((len(commands), len(self.commands) + 1), np.float32)
        onehot[np.arange(len(commands)), [index.get(str(c), len(self.commands)) for c in commands]] = 1.0
        s = (torch.as_tensor(states, dtype=torch.float32) - self.mean) / self.std
        return torch.cat([s, torch.from_numpy(onehot)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.horizon, 2) * self.traj_scale

    @torch.no_grad()
    def predict(self, states: np.ndarray, commands: Sequence[str]) -> np.ndarray:
        self.eval()
        return self(self.encode(states, commands)).numpy()


def fit_ego_status_mlp(states: np.ndarray, commands: Sequence[str], trajectories: np.ndarray, *,
                       epochs: int = 60, batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> EgoStatusMLP:
    """Train `EgoStatusMLP` by L2 on ``trajectories`` (``[N, T, 2]``, valid samples only)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = EgoStatusMLP(states.shape[1], sorted({str(c) for c in commands}), trajectories.shape[1])
    model.mean.copy_(torch.as_tensor(states.mean(0)))
    model.std.copy_(torch.as_tensor(states.std(0) + 1e-3))
    model.traj_scale.copy_(torch.as_tensor(np.abs(trajectories).mean(0) + 0.1))
    x = model.encode(states, commands)
    y = torch.as_tensor(trajectories, dtype=torch.float32)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = (model(x[idx]) - y[idx]).norm(dim=-1).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
    return model


# -- the report --------------------------------------------------------------------------------------

def evaluate_planner(pred: np.ndarray, truth: np.ndarray, agent_boxes: np.ndarray, agent_offsets: np.ndarray,
                     step_seconds: float, ego_size: tuple[float, float] | np.ndarray,
                     seconds: Sequence[float] = REPORT_SECONDS) -> dict[str, Any]:
    """L2 and collision rate of one planner on N samples (both conventions), plus the per-time curves."""
    horizon_seconds = truth.shape[1] * step_seconds
    err, times = l2_errors(pred, truth, step_seconds, horizon_seconds)
    hits, _ = collisions(pred, agent_boxes, agent_offsets, step_seconds, horizon_seconds, ego_size)
    l2_t, col_t = err.mean(0), hits.mean(0)
    out: dict[str, Any] = {**_summarise(l2_t, times, "l2", seconds), **_summarise(col_t, times, "collision", seconds)}
    out["l2_per_time"] = l2_t.tolist()
    out["collision_per_time"] = col_t.tolist()
    out["times"] = times.tolist()
    out["samples"] = int(len(pred))
    return out


def open_loop_report(planners: dict[str, np.ndarray], truth: np.ndarray, agent_boxes: np.ndarray,
                     agent_offsets: np.ndarray, step_seconds: float, ego_size: tuple[float, float] | np.ndarray
                     ) -> dict[str, dict[str, Any]]:
    """`evaluate_planner` for each named planner (e.g. model, const_velocity, ego_mlp) plus the ground truth
    (its collision rate is the floor the annotations allow: near 0 unless boxes touch the ego's own path)."""
    rows = {name: evaluate_planner(p, truth, agent_boxes, agent_offsets, step_seconds, ego_size)
            for name, p in planners.items()}
    rows["ground_truth"] = evaluate_planner(truth, truth, agent_boxes, agent_offsets, step_seconds, ego_size)
    return rows


def format_table(report: dict[str, dict[str, Any]], seconds: Sequence[float] = REPORT_SECONDS) -> str:
    """A fixed-width table of L2 and collision rate (at-time / averaged) per planner."""
    head = f"{'planner':<16}" + "".join(f"{f'L2@{s:g}s':>14}" for s in seconds) + \
        "".join(f"{f'col@{s:g}s %':>14}" for s in seconds)
    lines = [head + "   (at-time / averaged)", "-" * len(head)]
    for name, r in report.items():
        cells = "".join(f"{r.get(f'l2_at_{s:g}s', float('nan')):>7.3f}/{r.get(f'l2_avg_{s:g}s', float('nan')):<6.3f}"
                        for s in seconds)
        cells += "".join(f"{100 * r.get(f'collision_at_{s:g}s', float('nan')):>7.2f}/"
                         f"{100 * r.get(f'collision_avg_{s:g}s', float('nan')):<6.2f}" for s in seconds)
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)


def plot_open_loop(reports: dict[str, dict[str, dict[str, Any]]], path: str | Path) -> Path:
    """L2 and collision rate against time, one column per data source, one line per planner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = len(reports)
    fig, axes = plt.subplots(2, cols, figsize=(4.5 * cols, 6.5), squeeze=False)
    for c, (source, report) in enumerate(reports.items()):
        for name, r in report.items():
            style = "--" if name == "ground_truth" else "-"
            if name != "ground_truth":
                axes[0, c].plot(r["times"], r["l2_per_time"], style, marker="o", label=name)
            axes[1, c].plot(r["times"], 100 * np.asarray(r["collision_per_time"]), style, marker="o", label=name)
        n = next(iter(report.values()))["samples"]
        axes[0, c].set_title(f"{source} (held out, {n} samples)")
        axes[0, c].set_ylabel("L2 error at t (m)")
        axes[1, c].set_ylabel("collision rate at t (%)")
        axes[1, c].set_xlabel("time ahead (s)")
        for ax in axes[:, c]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
