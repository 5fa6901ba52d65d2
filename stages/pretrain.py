"""Stage 1 — pretrain: contrastive image–caption alignment of the vision and text encoders (CLIP-style).

Captions are the simulator's ground-truth frame captions (nearby vehicles and where they are, lane,
speed, manoeuvre) and nuScenes scene descriptions (`pretrain.caption_sources`). The loss pulls each
image towards its own caption and away from the others in the batch, with a learnable temperature;
identical captions in a batch all count as positives. Held-out recall@1/@5 in both directions is
reported beside the chance level, over all val pairs and per source.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stages.accel import autocast, configure_backends, make_adamw
from stages.common import resolve_device, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.data.shards import ShardedDataset, load_split_arrays, make_loader
from stages.resume import ResumePoint, fingerprint
from stages.training import TokenCache, encoder_parameters, load_or_init, rng_state, save_checkpoint, set_rng_state

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


def run(cfg: PipelineConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    configure_backends(device)
    p = cfg.pretrain
    sources = p.caption_sources
    train_ds = ShardedDataset(cfg.data.built, "train", shuffle=True, seed=cfg.seed, sources=sources)
    loader = make_loader(train_ds, p.batch_size, cfg.data.num_workers)
    val = load_split_arrays(cfg.data.built, "val", sources=sources, keys=("images", "captions"))

    model = load_or_init(cfg, upstream=None).to(device)
    tokens = TokenCache(model)
    params = encoder_parameters(model)
    optim = make_adamw(params, lr=p.learning_rate, weight_decay=p.weight_decay, device=device)
    resume = ResumePoint("pretrain", fingerprint(cfg.model, cfg.data, p, cfg.seed))
    start_epoch, history = 0, []
    if (state := resume.load()) is not None:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]
        log.info("%s: resuming after epoch %d of %d", "pretrain", start_epoch, p.epochs)

    t0 = time.perf_counter()
    for epoch in range(start_epoch, p.epochs):
        model.train()
        train_ds.set_epoch(epoch)
        losses = []
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{p.epochs}", unit="batch",
                   total=-(-len(train_ds) // p.batch_size))
        for batch in bar:
            caps = batch["caption"]
            if len(caps) < 2:
                continue
            with autocast(device):
                img = model.encode_image(batch["image"].to(device, non_blocking=True))
                txt = model.encode_text(tokens(caps, device))
            loss = contrastive_loss(img.float(), txt.float(), model.logit_scale, caps)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        recall = evaluate(model, val, tokens, device)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "temperature": float(1.0 / model.logit_scale.exp().clamp(max=100.0).item()), **recall})
        log.info("pretrain epoch %d: loss %.3f, i2t@1 %.3f t2i@1 %.3f (chance %.3f)", epoch + 1, history[-1]["loss"],
                 recall["i2t_recall@1"], recall["t2i_recall@1"], recall["chance@1"])
        resume.save({"model": model.state_dict(), "optim": optim.state_dict(), "rng": rng_state(),
                     "epoch": epoch + 1, "history": history})

    final = history[-1]
    metrics = {k: v for k, v in final.items() if k != "epoch"}
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    save_checkpoint(model.cpu(), p.out, extra={"stage": "pretrain", "metrics": metrics})
    write_json(Path(cfg.metrics_dir) / "pretrain.json", metrics)
    write_json(Path(cfg.metrics_dir) / "pretrain_history.json", history)
    resume.clear()
    return {"paths": {"checkpoint": p.out}, "metrics": metrics}


def main() -> None:
    stage_main("pretrain", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
