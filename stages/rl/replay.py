"""Replay storage for SAC: online transitions in a ring, an optional offline partition, mixed batches.

Memory. An observation is stored once, not twice: a transition at row ``r`` finds its next
observation at row ``next_row[r]``. Online, each env owns a column of a ring (``row = slot *
num_envs + env``) and its next observation is the following slot of the same column; when an
episode ends, the final observation takes one extra slot, which is never sampled as a transition
start, and the reset observation starts the slot after it. Images stay uint8; a command is stored
as an index into a table of the distinct token rows (a few dozen commands, not one 192-id row per
step). A 64x64 camera costs ~12 KB per transition; `buffer_size` x that is what the ring holds.

Bootstrapping. ``terminated`` cuts the bootstrap; a time-limit truncation does not: its transition
keeps the real final observation (from ``info["final_obs"]``, same-step autoreset) and the target
bootstraps from it, as it should.

Offline to online. ``add_offline_samples`` loads a recorded dataset (`stages.data.dataset.Samples`)
into a fixed partition (next observations are the following rows of the same episode) and
``sample`` draws ``round(batch_size * offline_ratio)`` of every batch from it, the rest online.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["ReplayBatch", "ReplayBuffer"]


@dataclass
class ReplayBatch:
    """``obs`` / ``next_obs`` hold ``state`` and, for driving, ``image`` (uint8) and ``tokens`` (int64)."""

    obs: dict[str, torch.Tensor]
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: dict[str, torch.Tensor]
    terminated: torch.Tensor  # float 0/1: 1 cuts the bootstrap
    offline: torch.Tensor  # bool: the row came from the offline partition


class _Storage:
    """Observation rows plus the transition that starts at each row (if ``valid``)."""

    def __init__(self, rows: int, state_shape: tuple[int, ...], state_dtype: np.dtype, action_dim: int,
                 image_shape: tuple[int, ...] | None, has_text: bool):
        self.rows = rows
        self.states = np.zeros((rows, *state_shape), dtype=state_dtype)
        self.images = np.zeros((rows, *image_shape), dtype=np.uint8) if image_shape is not None else None
        self.text_ids = np.zeros(rows, dtype=np.int32) if has_text else None
        self.actions = np.zeros((rows, action_dim), dtype=np.float32)
        self.rewards = np.zeros(rows, dtype=np.float32)
        self.terminated = np.zeros(rows, dtype=bool)
        self.valid = np.zeros(rows, dtype=bool)
        self.next_row = np.zeros(rows, dtype=np.int64)

    def write_obs(self, rows: np.ndarray, states: np.ndarray, images: np.ndarray | None,
                  text_ids: np.ndarray | None) -> None:
        self.states[rows] = states
        if self.images is not None:
            self.images[rows] = images
        if self.text_ids is not None:
            self.text_ids[rows] = text_ids

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in ("states", "actions", "rewards", "terminated", "valid", "next_row")}
        if self.images is not None:
            out["images"] = self.images
        if self.text_ids is not None:
            out["text_ids"] = self.text_ids
        return out


class ReplayBuffer:
    """SAC's replay buffer (see the module docstring).

    Observations passed to :meth:`add` are dicts of arrays with a leading ``num_envs`` axis:
    ``state`` always, ``image`` (uint8) when ``image_shape`` is given, ``tokens`` (int64 ids, any
    length up to ``token_length``; shorter rows are zero-padded) when ``token_length`` is given.
    """

    def __init__(self, capacity: int, state_shape: tuple[int, ...] | int, action_dim: int, num_envs: int = 1,
                 image_shape: tuple[int, ...] | None = None, token_length: int | None = None,
                 offline_ratio: float = 0.0, state_dtype: Any = np.float32):
        if capacity < 1 or num_envs < 1:
            raise ValueError(f"capacity ({capacity}) and num_envs ({num_envs}) must be >= 1")
        if not 0.0 <= offline_ratio <= 1.0:
            raise ValueError(f"offline_ratio must lie in [0, 1], got {offline_ratio}")
        self.state_shape = (state_shape,) if isinstance(state_shape, int) else tuple(state_shape)
        self.state_dtype = np.dtype(state_dtype)
        self.action_dim = action_dim
        self.num_envs = num_envs
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.token_length = token_length
        self.offline_ratio = offline_ratio
        # One spare slot per column: the pending next observation of the newest transition.
        self.slots = math.ceil(capacity / num_envs) + 1
        self.capacity = capacity
        self._online = self._storage(self.slots * num_envs)
        self._offline: _Storage | None = None
        self._offline_starts = np.zeros(0, dtype=np.int64)
        self._slot = np.zeros(num_envs, dtype=np.int64)  # next slot each env writes
        self._touched = 0  # slots in use (sampling draws below it)
        self._text_index: dict[bytes, int] = {}
        self._text_table = np.zeros((0, token_length or 0), dtype=np.int64)

    def _storage(self, rows: int) -> _Storage:
        return _Storage(rows, self.state_shape, self.state_dtype, self.action_dim, self.image_shape,
                        self.token_length is not None)

    # -- text ---------------------------------------------------------------------------------
    def _text_ids(self, tokens: np.ndarray | None) -> np.ndarray | None:
        if self.token_length is None:
            return None
        if tokens is None:
            raise ValueError("this buffer stores commands: pass obs['tokens'] (token ids)")
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.shape[-1] > self.token_length:
            if np.any(tokens[:, self.token_length:]):
                raise ValueError(f"token rows of length {tokens.shape[-1]} exceed token_length={self.token_length}")
            tokens = tokens[:, :self.token_length]
        if tokens.shape[-1] < self.token_length:
            tokens = np.pad(tokens, ((0, 0), (0, self.token_length - tokens.shape[-1])))
        ids = np.empty(len(tokens), dtype=np.int32)
        new_rows = []
        for i, row in enumerate(tokens):
            key = row.tobytes()
            idx = self._text_index.get(key)
            if idx is None:
                idx = self._text_index[key] = len(self._text_index)
                new_rows.append(row)
            ids[i] = idx
        if new_rows:
            self._text_table = np.concatenate([self._text_table, np.stack(new_rows)])
        return ids

    # -- online -------------------------------------------------------------------------------
    def add(self, obs: dict[str, np.ndarray], actions: np.ndarray, rewards: np.ndarray,
            next_obs: dict[str, np.ndarray], terminated: np.ndarray, done: np.ndarray) -> None:
        """One vector step. ``next_obs`` must already hold the final observation for envs whose
        episode ended (``done`` = terminated or truncated); only ``terminated`` cuts the bootstrap."""
        n, s = self.num_envs, self._online
        envs = np.arange(n)
        rows = self._slot * n + envs
        next_rows = ((self._slot + 1) % self.slots) * n + envs
        s.write_obs(rows, obs["state"], obs.get("image"), self._text_ids(obs.get("tokens")))
        s.write_obs(next_rows, next_obs["state"], next_obs.get("image"), self._text_ids(next_obs.get("tokens")))
        s.valid[next_rows] = False  # holds an observation, no transition yet
        s.actions[rows] = actions
        s.rewards[rows] = rewards
        s.terminated[rows] = terminated
        s.next_row[rows] = next_rows
        s.valid[rows] = True
        done = np.asarray(done, dtype=bool)
        self._touched = min(self.slots, max(self._touched, int(self._slot.max()) + 2))
        # After an episode end the final observation keeps its slot; the reset one starts the next.
        self._slot = (self._slot + 1 + done) % self.slots

    # -- offline ------------------------------------------------------------------------------
    def add_offline_samples(self, samples: Any, tokenize: Callable[[list[str]], Any] | None = None,
                            terminated: np.ndarray | None = None) -> int:
        """Load recorded episodes as the offline partition, replacing any earlier one; returns the
        number of usable transitions.

        ``samples`` is the built dataset's `SplitArrays` (`stages.data.shards.load_split_arrays`:
        ``next_index``, ``terminated``, ``action_valid``) or the episodes' `Samples`
        (`stages.data.dataset.load_split`: consecutive rows of each ``episode``, ``dones``).
        A transition needs a next observation unless it terminated (no bootstrap, so the next
        observation is never used): an episode's truncated last step is dropped, its terminated
        last step kept. Without ``terminated`` (argument or field) every last step is dropped.
        """
        states = np.asarray(samples.states)
        n = len(states)
        if n == 0:
            raise ValueError("offline samples are empty: record some episodes with the data stage first")
        if states.shape[1:] != self.state_shape:
            raise ValueError(f"offline states have shape {states.shape[1:]} but the env's are {self.state_shape}")
        images = None
        if self.image_shape is not None:
            images = np.asarray(samples.images)
            if images.shape[1:] != self.image_shape:
                raise ValueError(f"offline images are {images.shape[1:]} but the env renders {self.image_shape}: "
                                 "record the data with the same env.image_size (rerun the data stage)")
        actions = np.asarray(samples.actions, dtype=np.float32).reshape(n, -1)
        if actions.shape[1] != self.action_dim:
            raise ValueError(f"offline actions have {actions.shape[1]} dimensions, the env has {self.action_dim}")
        text_ids = None
        if self.token_length is not None:
            if tokenize is None:
                raise ValueError("this buffer stores commands: pass tokenize (e.g. model.tokenize)")
            commands = [str(c) for c in samples.commands]
            distinct = list(dict.fromkeys(commands))
            table = np.asarray(torch.as_tensor(tokenize(distinct)).cpu(), dtype=np.int64)
            rows_of = dict(zip(distinct, self._text_ids(table)))
            text_ids = np.array([rows_of[c] for c in commands], dtype=np.int32)

        if terminated is None:
            terminated = getattr(samples, "terminated", None)
        if terminated is None:
            log.warning("offline samples carry no 'terminated' flags: dropping the last step of every episode")
            term = np.zeros(n, dtype=bool)
        else:
            term = np.asarray(terminated, dtype=bool)
        rows = np.arange(n)
        next_index = getattr(samples, "next_index", None)
        if next_index is not None:
            next_index = np.asarray(next_index, dtype=np.int64)
            has_next = next_index >= 0
            next_row = np.where(has_next, next_index, rows)
        else:
            episode, dones = np.asarray(samples.episode), np.asarray(samples.dones, dtype=bool)
            has_next = np.zeros(n, dtype=bool)
            has_next[:-1] = (episode[1:] == episode[:-1]) & ~dones[:-1]
            next_row = np.where(has_next, rows + 1, rows)
        valid = has_next | term
        action_valid = getattr(samples, "action_valid", None)
        if action_valid is not None:  # e.g. nuScenes keyframes: no controls were recorded
            valid &= np.asarray(action_valid, dtype=bool)
        s = self._storage(n)
        s.write_obs(rows, states, images, text_ids)
        s.actions[:] = actions
        s.rewards[:] = np.asarray(samples.rewards, dtype=np.float32)
        s.terminated[:] = term
        s.valid[:] = valid
        s.next_row[:] = next_row
        self._offline = s
        self._offline_starts = np.flatnonzero(valid)
        log.info("replay: %d offline transitions of %d samples", len(self._offline_starts), n)
        return len(self._offline_starts)

    @classmethod
    def from_samples(cls, samples: Any, capacity: int, tokenize: Callable[[list[str]], Any] | None = None,
                     num_envs: int = 1, offline_ratio: float = 0.5, token_length: int | None = None,
                     terminated: np.ndarray | None = None) -> "ReplayBuffer":
        """A buffer shaped like ``samples`` (images, states, commands) and seeded with them."""
        images = getattr(samples, "images", None)
        has_text = tokenize is not None
        if has_text and token_length is None:
            token_length = int(torch.as_tensor(tokenize(["x"])).shape[-1])
        buffer = cls(capacity, np.asarray(samples.states).shape[1:], np.asarray(samples.actions).shape[-1],
                     num_envs=num_envs, image_shape=None if images is None else np.asarray(images).shape[1:],
                     token_length=token_length if has_text else None, offline_ratio=offline_ratio)
        buffer.add_offline_samples(samples, tokenize, terminated)
        return buffer

    # -- sizes and sampling -------------------------------------------------------------------
    @property
    def online_size(self) -> int:
        """Online transitions that can be sampled."""
        return int(self._online.valid[: self._touched * self.num_envs].sum())

    @property
    def offline_size(self) -> int:
        return len(self._offline_starts)

    def __len__(self) -> int:
        return self.online_size + self.offline_size

    def _online_rows(self, k: int, rng: np.random.Generator) -> np.ndarray:
        # Rejection sampling: invalid rows (a pending next observation per env, one final
        # observation per episode) are a small share of the touched ones.
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        valid, n = self._online.valid, self.num_envs
        parts, need = [], k
        for _ in range(32):
            cand = rng.integers(0, self._touched, size=2 * need + 8) * n + rng.integers(0, n, size=2 * need + 8)
            cand = cand[valid[cand]][:need]
            parts.append(cand)
            need -= len(cand)
            if need == 0:
                return np.concatenate(parts)
        # Almost only invalid rows (a buffer holding a handful of transitions): draw exactly.
        return np.concatenate([*parts, rng.choice(np.flatnonzero(valid), size=need)])

    def sample(self, batch_size: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> ReplayBatch:
        """``round(batch_size * offline_ratio)`` offline rows and the rest online, both uniform;
        all from one partition when the other is empty."""
        on, off = self.online_size, self.offline_size
        if on == 0 and off == 0:
            raise ValueError("the replay buffer is empty: add transitions before sampling")
        n_off = int(round(batch_size * self.offline_ratio)) if on and off else (batch_size if off else 0)
        parts = [(self._online, self._online_rows(batch_size - n_off, rng), False)]
        if n_off:
            parts.append((self._offline, self._offline_starts[rng.integers(0, off, size=n_off)], True))
        arrays: dict[str, list[np.ndarray]] = {}
        for storage, rows, is_offline in parts:
            nxt = storage.next_row[rows]
            for name, value in (("actions", storage.actions[rows]), ("rewards", storage.rewards[rows]),
                                ("terminated", storage.terminated[rows].astype(np.float32)),
                                ("offline", np.full(len(rows), is_offline))):
                arrays.setdefault(name, []).append(value)
            for prefix, r in (("obs.", rows), ("next.", nxt)):
                arrays.setdefault(prefix + "state", []).append(storage.states[r])
                if storage.images is not None:
                    arrays.setdefault(prefix + "image", []).append(storage.images[r])
                if storage.text_ids is not None:
                    arrays.setdefault(prefix + "tokens", []).append(self._text_table[storage.text_ids[r]])
        t = {k: torch.from_numpy(np.concatenate(v)).to(device) for k, v in arrays.items()}
        return ReplayBatch(obs={k[4:]: v for k, v in t.items() if k.startswith("obs.")},
                           actions=t["actions"], rewards=t["rewards"],
                           next_obs={k[5:]: v for k, v in t.items() if k.startswith("next.")},
                           terminated=t["terminated"], offline=t["offline"])

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self, include_offline: bool = False) -> dict[str, Any]:
        """Everything needed to continue; the offline partition is left out by default (it is
        reloaded from the dataset)."""
        state: dict[str, Any] = {"slot": self._slot.copy(), "touched": self._touched,
                                 "text_table": self._text_table.copy(),
                                 "online": {k: v.copy() for k, v in self._online.arrays().items()}}
        if include_offline and self._offline is not None:
            state["offline"] = {k: v.copy() for k, v in self._offline.arrays().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        online = state["online"]
        if online["states"].shape != self._online.states.shape:
            raise ValueError(f"saved buffer holds {online['states'].shape} states, this one "
                             f"{self._online.states.shape}: same buffer_size, num_envs and env needed")
        for key, value in online.items():
            getattr(self._online, key)[...] = value
        self._slot = np.asarray(state["slot"]).copy()
        self._touched = int(state["touched"])
        self._text_table = np.asarray(state["text_table"]).copy()
        self._text_index = {row.tobytes(): i for i, row in enumerate(self._text_table)}
        if "offline" in state:
            off = state["offline"]
            self._offline = self._storage(len(off["states"]))
            for key, value in off.items():
                getattr(self._offline, key)[...] = value
            self._offline_starts = np.flatnonzero(self._offline.valid)
