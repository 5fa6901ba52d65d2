"""SAC's resumable state: what `SACTrainer` checkpoints and how it loads it back.

The state holds the model, critics, targets, optimisers, α, counters, RNG states, episode statistics
and, while it is small enough, the online replay buffer. Under data parallelism the shared part
(weights, optimisers, counters) is saved once and each rank's own part (RNG states, episodes,
buffer) is gathered into ``ranks``; every rank reads the file to resume.

Checkpoints. With a ``save_dir``, ``train`` writes ``checkpoint.pt`` every
``checkpoint_every_steps`` env steps and at the end (model, critics, targets, optimisers, α,
counters, RNG states, episode statistics and the online replay buffer when it is at most
``checkpoint_buffer_bytes``, 256 MiB by default), and scalars (TensorBoard and ``scalars.jsonl``).
A new trainer given the same ``save_dir`` resumes at the saved step count; a buffer left out of the
checkpoint is refilled first (no updates for ``batch_size`` steps of every env), so a resumed run
never trains on a handful of transitions.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from stages.rl.checkpoint import TrainingCheckpoint, capture_rng, restore_rng

log = logging.getLogger(__name__)


@torch.no_grad()
def broadcast_from_rank0(t: Any) -> None:
    """Start every rank from rank 0's weights; averaged gradients keep them equal after that."""
    for module in (t.model, t.critic, t.critic_target):
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    torch.distributed.broadcast(t.log_alpha.data, src=0)


def resume(t: Any, ckpt: TrainingCheckpoint) -> None:
    """Load ``ckpt`` into trainer ``t`` when there is one that fits it; else start afresh."""
    if (state := ckpt.load()) is None:
        return
    if (why := misfit(t, state)) is not None:
        # Every rank reads the same file, so every rank decides alike.
        log.warning("sac: %s does not fit this trainer (%s); starting afresh", ckpt.path, why)
        return
    t.load_state_dict(state)
    log.info("sac: resumed at step %d (update %d) from %s", t.global_step, t.updates, ckpt.path)


def save(t: Any, ckpt: TrainingCheckpoint, buffer_bytes: int) -> None:
    """Write the checkpoint (rank 0), with every rank's own part gathered into it."""
    size = t.buffer.online_nbytes
    include = size <= buffer_bytes
    if not include and not t._buffer_left_out_logged:
        log.warning("sac: the replay buffer (%.0f MiB) exceeds checkpoint_buffer_bytes (%.0f MiB): checkpoints "
                    "leave it out and a resumed run refills it", size / 2**20, buffer_bytes / 2**20)
        t._buffer_left_out_logged = True
    local = _local_state(t, include)
    if not t.dist.enabled:
        ckpt.save({**_shared_state(t), **local})
        return
    parts: list[Any] | None = [None] * t.world_size if t.dist.is_main else None
    torch.distributed.gather_object(local, parts, dst=0)
    if t.dist.is_main:
        ckpt.save({**_shared_state(t), "ranks": parts})

def _shared_state(t: Any) -> dict[str, Any]:
    """What is the same on every rank: weights, optimisers, α, counters."""
    return {
        "model": {k: v.detach().cpu() for k, v in t.model.state_dict().items()},
        "critic": t.critic.state_dict(), "critic_target": t.critic_target.state_dict(),
        "actor_optimizer": t.actor_optimizer.state_dict(),
        "critic_optimizer": t.critic_optimizer.state_dict(),
        "log_alpha": t.log_alpha.detach().cpu(),
        "alpha_optimizer": t.alpha_optimizer.state_dict() if t.alpha_optimizer is not None else None,
        "global_step": t.global_step, "updates": t.updates, "update_debt": t.update_debt,
        "updates_from": t._updates_from, "world_size": t.world_size, "storage": t.storage,
    }

def _local_state(t: Any, include_buffer: bool) -> dict[str, Any]:
    """What each rank has of its own: RNG states, episode statistics, the replay buffer."""
    state: dict[str, Any] = {"rng": {**capture_rng(), "trainer": t.rng.bit_generator.state,
                                     "actions": t.action_rng.bit_generator.state},
                             "episode_returns": list(t.episode_returns),
                             "episode_completion": list(t.episode_completion)}
    if include_buffer:
        state["buffer"] = t.buffer.state_dict()
    return state

def state_dict(t: Any, include_buffer: bool = False) -> dict[str, Any]:
    """Model, critics, targets, optimisers, alpha, counters, RNG states and episode statistics;
    the replay buffer's online part when ``include_buffer`` (it can be large: ``buffer_size``
    observations). Under data parallelism this is this rank's view (`train` gathers all ranks')."""
    return {**_shared_state(t), **_local_state(t, include_buffer)}

def misfit(t: Any, state: dict[str, Any]) -> str | None:
    """Why ``state`` cannot be resumed here (another algorithm's checkpoint in the same
    directory, other settings), or None. Checked before loading, which would change weights
    part way through."""
    if not all(k in state for k in ("model", "critic", "critic_target", "global_step")):
        return "not a SAC checkpoint"
    if state.get("storage", t.storage) != t.storage:
        return f"its replay buffer holds {state['storage']}, this trainer's {t.storage}"
    for name, module in (("model", t.model), ("critic", t.critic)):
        mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if {k: tuple(v.shape) for k, v in state[name].items()} != mine:
            return f"its {name} has other parameters or shapes"
    return None

def load_state_dict(t: Any, state: dict[str, Any]) -> None:
    """Continue from :meth:`state_dict` or a checkpoint; the envs start fresh episodes."""
    if state.get("storage", t.storage) != t.storage:
        raise ValueError(f"the state was saved with a replay buffer of {state['storage']}, this trainer stores "
                         f"{t.storage}: train with the same freeze_encoders / train_trunk")
    t.model.load_state_dict(state["model"])
    t.critic.load_state_dict(state["critic"])
    t.critic_target.load_state_dict(state["critic_target"])
    t.actor_optimizer.load_state_dict(state["actor_optimizer"])
    t.critic_optimizer.load_state_dict(state["critic_optimizer"])
    with torch.no_grad():
        t.log_alpha.copy_(state["log_alpha"].to(t.device))
    if t.alpha_optimizer is not None and state.get("alpha_optimizer") is not None:
        t.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
    t.global_step, t.updates = int(state["global_step"]), int(state["updates"])
    t.update_debt = float(state.get("update_debt", 0.0))

    parts = state["ranks"] if "ranks" in state else [state]
    local = parts[t.dist.rank] if t.dist.rank < len(parts) else None
    if local is not None:
        restore_rng(local["rng"])
        t.rng.bit_generator.state = local["rng"]["trainer"]
        t.action_rng.bit_generator.state = local["rng"]["actions"]
        t.episode_returns.extend(local.get("episode_returns", []))
        t.episode_completion.extend(local.get("episode_completion", []))
        if "buffer" in local:
            t.buffer.load_state_dict(local["buffer"])
    else:  # a rank the saved run did not have: streams of its own
        t.rng = np.random.default_rng([t.rank_seed, t.global_step])
        t.action_rng = np.random.default_rng([t.rank_seed, t.global_step, 1])
        torch.manual_seed(t.rank_seed + 7919 * t.global_step)
    t._updates_from = max(t.config.learning_starts, int(state.get("updates_from", 0)))
    # Decided alike on every rank (from the same file), so the ranks' updates stay in step.
    if len(parts) != t.world_size or not all("buffer" in p for p in parts):
        refill = math.ceil(t.config.batch_size / t.num_envs) * t.num_envs * t.world_size
        t._updates_from = max(t._updates_from, t.global_step + refill)
        log.info("sac: the state holds no replay buffer for this run: no updates until step %d refills it",
                 t._updates_from)
    t.collector.restart()
