"""Stage 1 — pretrain: contrastive image–caption alignment of the vision and text encoders (CLIP-style).

Captions are the simulator's ground-truth frame captions (nearby vehicles and where they are, lane,
speed, manoeuvre) and nuScenes scene descriptions (`pretrain.caption_sources`). The loss pulls each
image towards its own caption and away from the others in the batch, with a learnable temperature;
identical captions in a batch all count as positives. Held-out recall@1/@5 in both directions is
reported beside the chance level, over all val pairs and per source.

Under ``torchrun --nproc-per-node N -m stages.pretrain`` every rank walks the same globally shuffled
batches (same seed), its loader building only its own share of each (and the global batch's captions,
by index); it embeds its share, the embeddings are gathered with their gradients, so the loss, its
negatives and its positives mask are the global batch's on every rank, and rank 0 alone writes.
``pretrain.grad_accum_steps`` > 1 embeds a rank's share in micro-batches and still takes the loss over
the whole batch (a gradient cache: the embeddings first without a graph, then each micro-batch again,
back-propagating its slice of the embeddings' gradient), because in-batch negatives make the loss no
sum over micro-batches.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stages.accel import (Distributed, autocast, capture_rng, configure_backends, make_adamw, run_on_ranks,
                          maybe_compile, micro_batches, restore_rng, to_device)
from stages.checkpoint import restore, snapshot
from stages.common import resolve_device, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.data.shards import ShardedDataset, load_split_arrays, make_loader
from stages.resume import ResumePoint, fingerprint
from stages.training import TokenCache, load_or_init, save_checkpoint

log = logging.getLogger(__name__)

MAX_RETRIEVAL_PAIRS = 512


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE. Identical captions in one batch are all counted as positives."""
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.t()
    same = torch.tensor([[a == b for b in captions] for a in captions], device=img.device, dtype=img.dtype)
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t()))


@torch.no_grad()
def retrieval_recall(model, images: np.ndarray, captions: np.ndarray, tokens: TokenCache,
                     device: str, ks: tuple[int, ...] = (1, 5), max_pairs: int = MAX_RETRIEVAL_PAIRS,
                     seed: int = 0) -> dict[str, float]:
    """Recall@k for image→text and text→image over pairs with distinct captions (one image per caption,
    at most ``max_pairs`` of them, drawn evenly)."""
    _, first = np.unique(captions, return_index=True)
    if len(first) > max_pairs:
        first = np.random.default_rng(seed).choice(first, max_pairs, replace=False)
    first = np.sort(first)
    img = torch.from_numpy(images[first]).to(device)
    txt = tokens([str(c) for c in captions[first]], device)
    zi = torch.cat([model.encode_image(img[i:i + 128]) for i in range(0, len(img), 128)])
    zt = torch.cat([model.encode_text(txt[i:i + 128]) for i in range(0, len(txt), 128)])
    sim = zi @ zt.t()
    n = len(first)
    truth = torch.arange(n, device=device)
    out: dict[str, float] = {"pairs": n}
    for k in ks:
        k_eff = min(k, n)
        out[f"i2t_recall@{k}"] = (sim.topk(k_eff, dim=1).indices == truth[:, None]).any(1).float().mean().item()
        out[f"t2i_recall@{k}"] = (sim.t().topk(k_eff, dim=1).indices == truth[:, None]).any(1).float().mean().item()
        out[f"chance@{k}"] = k_eff / n
    return out


def evaluate(model, val, tokens: TokenCache, device: str) -> dict[str, float]:
    """Recall over every val pair, and per source (prefixed ``<source>_``) when there are several."""
    model.eval()
    out = retrieval_recall(model, val.images, val.captions, tokens, device)
    sources = sorted(set(val.source.tolist()))
    if len(sources) > 1:
        for source in sources:
            mask = val.source == source
            if len(np.unique(val.captions[mask])) >= 2:
                r = retrieval_recall(model, val.images[mask], val.captions[mask], tokens, device)
                out.update({f"{source}_{k}": v for k, v in r.items()})
    return out


Embed = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_embed(model, device: str, compile: bool | None = None) -> Embed:
    """``embed(image, tokens)``: the image and text embeddings in fp32, under autocast on CUDA; the
    encoders' forward (and so their backward) compiled where ``compile`` says (`maybe_compile`).
    ``model`` itself stays uncompiled, for saving."""
    def encode(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.encode_image(image).float(), model.encode_text(text).float()

    encode = maybe_compile(encode, compile, device)

    def embed(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device):
            return encode(image, text)
    return embed


def contrastive_step(model, embed: Embed, batch: dict[str, Any], captions: list[str], tokens: TokenCache,
                     device: str, dist: Distributed, steps: int = 1) -> torch.Tensor:
    """Back-propagate the contrastive loss of the global batch; return the loss (detached).

    ``batch`` is this rank's share (on ``device``), ``captions`` the global batch's captions (the
    positives mask), ``embed(image, tokens)`` the image and text embeddings in fp32. The gradients
    left in the parameters are, after :meth:`Distributed.average_gradients`, those of one process on
    the global batch, whatever the number of ranks and of micro-batches (``steps``)."""
    n = len(batch["caption"])
    if steps <= 1 and n:
        img, txt = embed(batch["image"], tokens(batch["caption"], device))
        # One gather for both embeddings: one collective each way, in the same order on every rank.
        both = dist.gather_with_grad(torch.cat([img, txt], 1))
        loss = contrastive_loss(*both.chunk(2, 1), model.logit_scale, captions)
        loss.backward()
        return loss.detach()
    # Gradient cache: the loss's gradient w.r.t. this rank's embeddings, from graph-free embeddings ...
    micro = micro_batches(batch, steps) if n else []
    states, cached = [], []
    with torch.no_grad():
        for mb in micro:
            states.append(capture_rng(device))
            cached.append(torch.cat(embed(mb["image"], tokens(mb["caption"], device)), 1))
    # A rank with no share (a global batch smaller than the world) still joins the gather's backward.
    local = torch.cat(cached) if cached else torch.zeros(0, 2 * model.config.embed_dim, device=device)
    local.requires_grad_(True)
    both = dist.gather_with_grad(local)
    loss = contrastive_loss(*both.chunk(2, 1), model.logit_scale, captions)
    loss.backward()
    # ... then each micro-batch again with its graph (and the same dropout), fed its slice of that gradient.
    after = capture_rng(device)
    lo = 0
    for mb, state in zip(micro, states):
        restore_rng(state, device)
        out = torch.cat(embed(mb["image"], tokens(mb["caption"], device)), 1)
        out.backward(local.grad[lo:lo + len(out)])
        lo += len(out)
    restore_rng(after, device)
    return loss.detach()


@dataclass
class _Training:
    """What the phases of one pretrain run share."""
    cfg: PipelineConfig
    dist: Distributed
    device: str
    train_ds: ShardedDataset
    loader: Any
    val: Any
    model: Any
    tokens: TokenCache
    params: list[torch.nn.Parameter]
    optim: torch.optim.Optimizer
    resume: ResumePoint
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    embed: Embed | None = None


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Train on this process, or as one rank of a ``torchrun`` job (data parallel, rank 0 writes)."""
    return run_on_ranks(cfg, _run)


def _run(cfg: PipelineConfig, dist: Distributed) -> dict[str, Any]:
    t = _init(cfg, dist)
    t0 = time.perf_counter()
    for epoch in range(t.start_epoch, cfg.pretrain.epochs):
        _end_epoch(t, epoch, _train_epoch(t, epoch))
    metrics = {k: v for k, v in t.history[-1].items() if k != "epoch"}
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    if dist.is_main:  # one writer: DVC's outputs, the metrics and the resume state
        _write_outputs(t, metrics)
    dist.barrier()
    return {"paths": {"checkpoint": cfg.pretrain.out}, "metrics": metrics}


def _init(cfg: PipelineConfig, dist: Distributed) -> _Training:
    """Data, model and optimiser, the saved state of a killed run, the (compiled) embedding."""
    seed_everything(cfg.seed)
    device = dist.device(resolve_device(cfg.device))
    configure_backends(device)
    p = cfg.pretrain
    sources = p.caption_sources
    train_ds = ShardedDataset(cfg.data.built, "train", shuffle=True, seed=cfg.seed, sources=sources)
    loader = make_loader(train_ds, p.batch_size, cfg.data.num_workers, pin_memory=device.startswith("cuda"),
                         rank=dist.rank, world_size=dist.world_size, captions=True)
    val = load_split_arrays(cfg.data.built, "val", sources=sources, keys=("images", "captions"))

    model = load_or_init(cfg, upstream=None).to(device)
    params = model.encoder_parameters()
    optim = make_adamw(params, lr=p.learning_rate, weight_decay=p.weight_decay, device=device)
    t = _Training(cfg, dist, device, train_ds, loader, val, model, TokenCache(model), params, optim,
                  ResumePoint("pretrain", fingerprint(cfg.model, cfg.data, p, cfg.seed)))
    if (state := t.resume.load()) is not None:
        restore(state, {"model": model, "optim": optim})
        t.start_epoch, t.history = state["epoch"], state["history"]
        log.info("%s: resuming after epoch %d of %d", "pretrain", t.start_epoch, p.epochs)
    t.embed = make_embed(model, device, p.compile)
    return t


def _train_epoch(t: _Training, epoch: int) -> list[float]:
    """One pass over the train split; the loss of every step."""
    p, dist = t.cfg.pretrain, t.dist
    t.model.train()
    t.train_ds.set_epoch(epoch)
    losses: list[float] = []
    bar = tqdm(t.loader, desc=f"pretrain epoch {epoch + 1}/{p.epochs}", unit="batch",
               total=len(t.loader), disable=not dist.is_main)
    for part in bar:
        # Every rank walks the same global batches (same seed) and holds its own share of this one;
        # the loss sees all of the global batch's captions.
        if part.size < 2:
            continue
        t.optim.zero_grad(set_to_none=True)
        loss = contrastive_step(t.model, t.embed, to_device(part.share, t.device), part.captions, t.tokens,
                                t.device, dist, p.grad_accum_steps)
        dist.average_gradients(t.params)
        torch.nn.utils.clip_grad_norm_(t.params, 1.0)
        t.optim.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _end_epoch(t: _Training, epoch: int, losses: list[float]) -> None:
    """Evaluate, log and record the epoch; save the resume state (rank 0).

    Every rank holds the same weights: each evaluates (no collective), rank 0 writes."""
    recall = evaluate(t.model, t.val, t.tokens, t.device)
    t.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                      "temperature": float(1.0 / t.model.logit_scale.exp().clamp(max=100.0).item()), **recall})
    log.info("pretrain epoch %d: loss %.3f, i2t@1 %.3f t2i@1 %.3f (chance %.3f)", epoch + 1, t.history[-1]["loss"],
             recall["i2t_recall@1"], recall["t2i_recall@1"], recall["chance@1"])
    if t.dist.is_main:
        t.resume.save(snapshot({"model": t.model, "optim": t.optim}, epoch=epoch + 1, history=t.history))


def _write_outputs(t: _Training, metrics: dict[str, Any]) -> None:
    """The checkpoint and the metrics; then the resume state goes."""
    save_checkpoint(t.model.cpu(), t.cfg.pretrain.out, extra={"stage": "pretrain", "metrics": metrics,
                                                              "world_size": t.dist.world_size})
    write_json(Path(t.cfg.metrics_dir) / "pretrain.json", metrics)
    write_json(Path(t.cfg.metrics_dir) / "pretrain_history.json", t.history)
    t.resume.clear()


def main() -> None:
    stage_main("pretrain", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
