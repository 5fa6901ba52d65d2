"""Behaviour-policy inference where the model lives: batched over whichever envs are ready, on the
learner's device, for the asynchronous rollout collector's thread mode (`stages.rl.async_collector`).

Why: a ViT-B policy on one CPU thread takes about a second per action, against a simulator's 40 ms
tick. On the GPU the same forward is milliseconds, but only once the per-kernel launch cost is
gone: at batch 1 to 16 a forward is all launches (2 ms as a CUDA graph against 12-24 ms eager on
an H100). So:

- **CUDA graphs per batch bucket.** A batch of ``k`` observations runs the graph of the next power
  of two (rows past ``k`` repeat row 0 and are dropped); each bucket is captured the first time it
  is needed (eager warm-up on the actor's stream, then capture). The weights are updated in place
  by :meth:`AsyncCollector.publish`, so a captured graph always reads the newest ones. A bucket
  whose capture fails (a model with a host sync in its forward) runs eagerly, logged once.
- **Its own high-priority stream.** The learner's update keeps the GPU busy; the actor's kernels
  are scheduled ahead of the update's as soon as SMs free up, so the envs do not wait behind a
  whole queued minibatch.
- **Frozen encoders.** With an `EncodedDrivingAdapter` the rollout stores the encoders' outputs;
  the vision encoder runs inside the same graph as the policy, so one replay gives both the stored
  vision tokens and the action. Text features come from the adapter's per-command cache.
- **Same numerics as the update.** The forward runs through `MixedPrecisionPolicy` with the
  trainer's precision (bf16 autocast network, fp32 distribution), as the update does.

Without CUDA (``graphs`` off) the same code runs eagerly: the CPU test of thread-mode collection
uses it.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from stages.rl.policies import EncodedDrivingAdapter, MixedPrecisionPolicy, ObsAdapter

log = logging.getLogger(__name__)

__all__ = ["DeviceActor", "bucket"]


def bucket(k: int) -> int:
    """The batch size a batch of ``k`` runs at: the next power of two."""
    return 1 << max(0, int(k) - 1).bit_length()


class DeviceActor:
    """``infer(observations)`` → stored fields, actions, log-probabilities, values and the weight
    version used, with ``model`` (the collector's behaviour copy, on ``device``).

    ``lock`` and ``version``: the collector's; inference holds the lock, so a publish never writes
    the weights while a forward reads them.
    """

    def __init__(self, model: nn.Module, adapter: ObsAdapter, device: torch.device, bf16: bool,
                 graphs: bool, lock: threading.Lock, version: Any) -> None:
        # A copy of the trainer's adapter, bound to the behaviour weights (the trainer keeps its own).
        adapter = copy.copy(adapter)
        adapter.bind(model)
        self.model, self.adapter, self.device = model, adapter, torch.device(device)
        self.encoded = isinstance(adapter, EncodedDrivingAdapter)
        self.policy = MixedPrecisionPolicy(adapter.policy(model), model, device, bf16)
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self.lock, self.version = lock, version
        self.stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], dict[str, Tensor]] | None] = {}

    # -- inputs --------------------------------------------------------------------------------
    def _prepare(self, observations: Sequence[Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(fields stored as they are, the forward's input arrays by name)."""
        obs = self.adapter.stack(observations)
        if self.encoded:
            kept = {"text_features": self.adapter.text_features([str(c) for c in obs["command"]]),
                    "state": np.asarray(obs["state"], dtype=np.float32)}
            return kept, {"image": np.asarray(obs["image"], dtype=np.uint8), **kept}
        fields = self.adapter.encode(obs)
        return fields, fields

    def _forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """The forward from input tensors to the outputs (and, frozen encoders, the vision tokens)."""
        out: dict[str, Tensor] = {}
        if self.encoded:
            _, vision_tokens = self.model.vision(x["image"])
            out["vision_tokens"] = vision_tokens.float()
            inputs: tuple[Tensor, ...] = (out["vision_tokens"], x["text_features"], x["state"])
        elif "tokens" in x:  # untrimmed: a graph needs fixed shapes (the model masks the padding)
            inputs = (x["image"], x["state"].float(), x["tokens"])
        else:
            inputs = self.adapter.model_inputs(x)
        out["action"], out["log_prob"], out["value"] = self.policy.act(*inputs)
        return out

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, observations: Sequence[Any]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray,
                                                             np.ndarray, int]:
        kept, arrays = self._prepare(observations)
        k = len(observations)
        with self.lock, _on(self.stream):
            version = int(self.version.value)
            tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for name, a in arrays.items()}
            graph = self._graph(tensors) if self.graphs else None
            if graph is None:
                out = self._forward(tensors)
            else:
                g, static_in, static_out = graph
                for name, t in tensors.items():
                    static_in[name][:k].copy_(t)
                    static_in[name][k:].copy_(t[:1].expand_as(static_in[name][k:]))
                g.replay()
                out = {name: t[:k] for name, t in static_out.items()}
            host = {name: t.float().cpu().numpy() for name, t in out.items()}  # waits for this stream only
        fields = dict(kept)
        if "vision_tokens" in host:
            fields["vision_tokens"] = host["vision_tokens"]
        return fields, host["action"], host["log_prob"], host["value"], version

    def _graph(self, tensors: dict[str, Tensor]) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]] | None:
        size = bucket(len(next(iter(tensors.values()))))
        if size not in self._graphs:
            self._graphs[size] = self._capture(tensors, size)
        return self._graphs[size]

    def _capture(self, tensors: dict[str, Tensor], size: int) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]] | None:
        static_in = {name: t[:1].expand(size, *t.shape[1:]).clone() for name, t in tensors.items()}
        try:
            for _ in range(3):  # warm-up on this stream: cuBLAS / cuDNN handles and workspaces
                self._forward(static_in)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self.stream, capture_error_mode="thread_local"):
                static_out = self._forward(static_in)
        except Exception as exc:  # noqa: BLE001 - the bucket runs eagerly instead
            log.warning("device actor: CUDA graph capture at batch %d failed (%s: %s); running it eagerly",
                        size, type(exc).__name__, exc)
            torch.cuda.synchronize(self.device)
            return None
        log.info("device actor: captured a CUDA graph at batch %d", size)
        return g, static_in, static_out


def _on(stream: Any) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
