"""Stage 2 — offline: behaviour cloning of controls and trajectory, from the pretrained encoders.

The policy head learns the expert's controls by maximum likelihood, the trajectory head the future
waypoints (ego frame) by L2; both are conditioned on image, ego state and the text command.
Held-out open-loop L2 is reported beside a constant-velocity baseline on the same samples.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.distributions import ACTION_HIGH, ACTION_LOW
from stages.common import resolve_device, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.data.dataset import Samples, load_split
from stages.resume import ResumePoint, fingerprint
from stages.training import TokenCache, load_or_init, rng_state, save_checkpoint, set_rng_state

log = logging.getLogger(__name__)

# Expert controls sit on the bounds (full throttle, zero brake); the squashed policies' densities
# are infinite there, so targets are pulled this far inside.
_EDGE = 1e-3


def interior(actions: torch.Tensor) -> torch.Tensor:
    low = torch.as_tensor(ACTION_LOW, dtype=actions.dtype, device=actions.device)
    high = torch.as_tensor(ACTION_HIGH, dtype=actions.dtype, device=actions.device)
    return actions.clamp(low + _EDGE, high - _EDGE)


def bc_losses(model, batch: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(batch["image"], batch["state"], tokens)
    dist = model.distribution(out.action_params)
    control_nll = -dist.log_prob(interior(batch["action"])).mean()
    valid = batch["traj_valid"].float()
    err = (out.trajectory - batch["trajectory"]).pow(2).sum(-1).sqrt().mean(-1)
    traj_l2 = (err * valid).sum() / valid.sum().clamp(min=1.0)
    return {"control_nll": control_nll, "trajectory_l2": traj_l2,
            "control_mae": (dist.mode() - batch["action"]).abs().mean()}


def to_batch(s: Samples, idx: np.ndarray, device: str) -> dict[str, torch.Tensor]:
    return {
        "image": torch.from_numpy(s.images[idx]).to(device),
        "state": torch.from_numpy(s.states[idx]).to(device),
        "action": torch.from_numpy(s.actions[idx]).to(device),
        "trajectory": torch.from_numpy(s.trajectories[idx]).to(device),
        "traj_valid": torch.from_numpy(s.traj_valid[idx]).to(device),
    }


def constant_velocity(s: Samples, horizon: int, step_seconds: float) -> np.ndarray:
    """Baseline: keep going straight at the current speed (state[0])."""
    t = step_seconds * np.arange(1, horizon + 1, dtype=np.float32)
    traj = np.zeros((len(s.states), horizon, 2), dtype=np.float32)
    traj[:, :, 0] = s.states[:, :1] * t[None]
    return traj


def l2_at(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-waypoint L2 error averaged over samples: [horizon]."""
    return np.linalg.norm(pred - truth, axis=-1).mean(0)


@torch.no_grad()
def evaluate(model, s: Samples, tokens: TokenCache, device: str, batch_size: int = 256) -> dict[str, Any]:
    model.eval()
    preds, maes = [], []
    for i in range(0, len(s.actions), batch_size):
        idx = np.arange(i, min(i + batch_size, len(s.actions)))
        batch = to_batch(s, idx, device)
        out = model(batch["image"], batch["state"], tokens([str(c) for c in s.commands[idx]], device))
        preds.append(out.trajectory.cpu().numpy())
        maes.append((model.distribution(out.action_params).mode() - batch["action"]).abs().mean(0).cpu().numpy())
    pred = np.concatenate(preds)
    valid = s.traj_valid
    return {"l2_per_waypoint": l2_at(pred[valid], s.trajectories[valid]).tolist(),
            "control_mae": np.mean(maes, axis=0).tolist()}


def run(cfg: PipelineConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    o = cfg.offline
    horizon, stride = cfg.model.trajectory_length, cfg.data.waypoint_stride
    train = load_split(cfg.data.out, "train", horizon, stride)
    val = load_split(cfg.data.out, "val", horizon, stride)

    model = load_or_init(cfg, upstream=cfg.pretrain.out).to(device)
    tokens = TokenCache(model)
    optim = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, weight_decay=o.weight_decay)
    resume = ResumePoint("offline", fingerprint(cfg.model, cfg.data, cfg.pretrain, o, cfg.seed))
    start_epoch, history = 0, []
    if (state := resume.load()) is not None:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]

    t0 = time.perf_counter()
    n = len(train.actions)
    for epoch in range(start_epoch, o.epochs):
        model.train()
        order = np.random.permutation(n)
        sums: dict[str, float] = {}
        bar = tqdm(range(0, n, o.batch_size), desc=f"offline epoch {epoch + 1}/{o.epochs}", unit="batch")
        for i in bar:
            idx = order[i:i + o.batch_size]
            batch = to_batch(train, idx, device)
            parts = bc_losses(model, batch, tokens([str(c) for c in train.commands[idx]], device))
            loss = o.control_weight * parts["control_nll"] + o.trajectory_weight * parts["trajectory_l2"]
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
            bar.set_postfix(traj_l2=f"{parts['trajectory_l2'].item():.2f}", nll=f"{parts['control_nll'].item():.2f}")
        ev = evaluate(model, val, tokens, device)
        history.append({"epoch": epoch + 1, **{f"train_{k}": v / n for k, v in sums.items()},
                        "val_l2_mean": float(np.mean(ev["l2_per_waypoint"]))})
        log.info("offline epoch %d: val L2 %.3f m", epoch + 1, history[-1]["val_l2_mean"])
        resume.save({"model": model.state_dict(), "optim": optim.state_dict(), "rng": rng_state(),
                     "epoch": epoch + 1, "history": history})

    ev = evaluate(model, val, tokens, device)
    step_s = stride / cfg.env.policy_frequency
    cv = l2_at(constant_velocity(val, horizon, step_s)[val.traj_valid], val.trajectories[val.traj_valid])
    metrics = {
        "val_l2_mean": float(np.mean(ev["l2_per_waypoint"])),
        "val_l2_final": float(ev["l2_per_waypoint"][-1]),
        "const_velocity_l2_mean": float(cv.mean()),
        "const_velocity_l2_final": float(cv[-1]),
        "val_control_mae": ev["control_mae"],
        "horizon_seconds": horizon * step_s,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    save_checkpoint(model.cpu(), o.out, extra={"stage": "offline", "metrics": metrics})
    write_json(Path(cfg.metrics_dir) / "offline.json", metrics)
    write_json(Path(cfg.metrics_dir) / "offline_history.json", history)
    resume.clear()
    return {"paths": {"checkpoint": o.out}, "metrics": metrics}


def main() -> None:
    stage_main("offline", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
