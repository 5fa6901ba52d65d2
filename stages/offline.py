"""Stage 2 — offline: imitation (trajectory + controls) and offline RL (IQL) from the pretrained encoders.

Every batch of the built dataset (`stages.data.shards`, both sources) trains:

- behaviour cloning: the trajectory head on the future waypoints (L2 or L1, each waypoint's error
  divided by its spread over the train split, so the near waypoints count as much as the far ones),
  and the policy head on the clean expert's controls (maximum likelihood), conditioned on image,
  ego state and the text command. nuScenes keyframes (no controls) train the trajectory only;
- IQL (`stages.rl.iql`) on the simulator transitions and their rewards: expectile value (the model's
  value head, so stage 3 starts with a critic), twin Q heads with a target copy, and advantage-weighted
  regression of the same policy head. ``offline.bc_weight`` / ``offline.iql_weight`` set the mix.

Held-out open-loop metrics (`stages.metrics.open_loop`): L2 and collision rate at 1 / 2 / 3 s, both
conventions, per source, beside a constant-velocity and an ego-status MLP baseline; and how the value
function ranks clean expert states against perturbed ones (mean V, AUC).

Under ``torchrun --nproc-per-node N -m stages.offline`` every rank walks the same globally shuffled
batches (same seed) but its loader builds only its own share of each (`stages.data.shards.RankBatches`);
``offline.grad_accum_steps`` cuts a rank's share into micro-batches, each masked mean weighted by its
share of the global count, so one optimiser step sees the global batch's gradient.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.driving_vla import DrivingVLAOutput
from stages.accel import (
    Distributed,
    autocast,
    batch_size_of,
    configure_backends,
    make_adamw,
    maybe_compile,
    micro_batches,
    run_on_ranks,
    to_device,
)
from stages.checkpoint import restore, snapshot
from stages.common import resolve_device, seed_everything, stage_main, write_json
from stages.config import OfflineParams, PipelineConfig
from stages.data import dagger
from stages.data.dataset import DatasetError
from stages.data.shards import (
    ShardedDataset,
    SplitArrays,
    load_split_arrays,
    make_loader,
    read_manifest,
)
from stages.envs import make_env
from stages.metrics.held_out import evaluate
from stages.metrics.open_loop import fit_ego_status_mlp, format_table, plot_open_loop
from stages.offline_losses import bc_losses, interior, training_distribution
from stages.resume import ResumePoint, fingerprint
from stages.rl.evaluation import evaluate_policy
from stages.rl.iql import IQLConfig, IQLCritic, iql_losses
from stages.rl.selection import BestPolicyKeeper
from stages.training import TokenCache, load_or_init, save_checkpoint

log = logging.getLogger(__name__)

PLOT = Path("plots") / "offline_open_loop.png"
RUN_DIR = Path("runs") / "offline"
# Validation episodes of the closed-loop keeper: apart from the data's, DAgger's (3,000,000 +) and
# the online stage's validation (500,000 +) and held-out (1,000,000 +) seeds.
SELECT_SEED_OFFSET = 700_000


@torch.no_grad()
def fold_state_normalisation(model, mean: np.ndarray, std: np.ndarray) -> None:
    """Standardise the ego state inside the state encoder's first layer: ``W x + b`` becomes
    ``(W / std) x + (b - W mean / std)``, so the freshly initialised encoder sees unit-scale inputs
    while the model still takes the raw state (speed in m/s, front distance up to 50 m) as the env gives it.
    Without this the largest raw fields swamp the others and the speed, which sets how far the
    trajectory reaches, is hard to read precisely."""
    fc1 = model.state_encoder.fc1
    m = torch.as_tensor(mean, dtype=fc1.weight.dtype, device=fc1.weight.device)
    sd = torch.as_tensor(std, dtype=fc1.weight.dtype, device=fc1.weight.device).clamp(min=1e-2)
    fc1.weight.div_(sd)
    fc1.bias.sub_(fc1.weight @ m)


@torch.no_grad()
def init_heads(model, critic: IQLCritic | None, stats: dict[str, Any], gamma: float) -> None:
    """Start the heads at the data's means: the trajectory head at the mean train trajectory (its
    per-step offsets), the value and Q heads at the mean discounted return. The heads then learn the
    deviations from the mean instead of first climbing to its scale (60 m at 3 s, V ~ r / (1 - gamma));
    the policy at the expert's mean control (pre-tanh) and spread."""
    # The model's heads start almost silent (last layers at std 0.001, for a calm policy in online RL);
    # here they must first learn to read the features, so they start at the ViT init of every other layer.
    for head in (model.trajectory_head, model.value_head):
        torch.nn.init.trunc_normal_(head.fc2.weight, std=0.02)
    if model.config.trajectory_prior == "constant_velocity":
        # The head predicts corrections to the constant-velocity prior: start at none.
        model.trajectory_head.fc2.bias.zero_()
    elif stats.get("trajectory_mean") is not None:
        mean = torch.as_tensor(stats["trajectory_mean"], dtype=torch.float32)
        steps = torch.diff(mean, dim=0, prepend=torch.zeros(1, 2))
        model.trajectory_head.fc2.bias.copy_(steps.reshape(-1))
    if model.config.policy == "squashed_gaussian" and stats.get("action_pre_tanh_mean") is not None:
        dim = model.config.action_dim
        model.policy_head.fc2.bias[:dim] = torch.as_tensor(stats["action_pre_tanh_mean"])
        model.policy_head.fc2.bias[dim:] = torch.as_tensor(stats["action_pre_tanh_log_std"])
    v0 = stats.get("reward_mean", 0.0) / (1.0 - gamma) if gamma < 1 else 0.0
    model.value_head.fc2.bias.fill_(v0)
    if critic is not None:
        critic.init_bias(v0)


def _action_stats(s: SplitArrays, model, min_log_std: float) -> dict[str, list[float]]:
    """Mean and log-spread of the expert's controls in the squashed Gaussian's pre-tanh space."""
    actions = torch.as_tensor(s.expert_actions[s.action_valid])
    if not len(actions):
        return {}
    low, high = model.action_low.cpu(), model.action_high.cpu()
    u = torch.atanh((interior(actions) - (high + low) / 2) / ((high - low) / 2))
    return {"action_pre_tanh_mean": u.mean(0).tolist(),
            "action_pre_tanh_log_std": u.std(0).clamp(min=1e-6).log().clamp(min=min_log_std).tolist()}


def _upstream_stage(path: str | Path) -> str | None:
    info = Path(path) / "training.json"
    return json.loads(info.read_text()).get("stage") if info.exists() else None


def iql_config(o: OfflineParams) -> IQLConfig:
    return IQLConfig(gamma=o.iql_gamma, expectile=o.iql_expectile, temperature=o.iql_temperature,
                     max_weight=o.iql_max_weight, tau=o.iql_tau, reward_scale=o.reward_scale)


def fp32_forward(model) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], DrivingVLAOutput]:
    """The model's forward with fp32 outputs (under autocast they come out in bf16): what is compiled."""
    def forward(image: torch.Tensor, state: torch.Tensor, text: torch.Tensor) -> DrivingVLAOutput:
        out = model(image, state, text)
        return DrivingVLAOutput(tuple(p.float() for p in out.action_params), out.trajectory.float(),
                                out.value.float(), out.features.float())
    return forward


def _loss_counts(batch: dict[str, torch.Tensor], iql: bool) -> list[torch.Tensor]:
    """The samples each masked mean of the loss averages over: clean trajectories, known controls,
    RL transitions (``iql``: with a next state or terminal)."""
    transition = batch["action_valid"] & (batch["has_next"] | batch["terminated"]) if iql else batch["action_valid"]
    return [(batch["traj_valid"] & ~batch["perturbed"]).sum(), batch["action_valid"].sum(), transition.sum()]


def _micro_loss(forward, model, critic: IQLCritic | None, batch: dict[str, Any], tokens: TokenCache, device: str,
                scale: torch.Tensor, o: OfflineParams, iql_cfg: IQLConfig, w_traj: float, w_ctrl: float,
                w_rl: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted loss of one micro-batch and its unweighted parts (for the log)."""
    with autocast(device):
        out = forward(batch["image"], batch["state"], tokens(batch["command"], device))
    parts = bc_losses(model, out, batch, scale, o.trajectory_loss, o.min_log_std)
    loss = o.trajectory_weight * w_traj * parts["trajectory"] \
        + o.bc_weight * o.control_weight * w_ctrl * parts["control_nll"]
    if critic is None:
        return loss, parts
    transition = batch["action_valid"] & (batch["has_next"] | batch["terminated"])
    with torch.no_grad():
        # Outside autocast, as the regression target it is: fp32.
        next_value = forward(batch["next_image"], batch["next_state"], tokens(batch["next_command"], device)).value
    if transition.any():
        t = transition
        actions = interior(batch["action"][t])
        log_prob = training_distribution(model, tuple(p[t] for p in out.action_params),
                                         o.min_log_std).log_prob(actions)
        # The critic reads the features without shaping them: its regression targets are
        # returns of ~r / (1 - gamma), and their gradients would swamp imitation's in the encoder.
        feats = out.features[t].detach()
        value = model.value_head(feats).squeeze(-1)
        rl = iql_losses(value, next_value[t], feats, log_prob, actions,
                        batch["reward"][t].float(), batch["terminated"][t], critic, iql_cfg)
        loss = loss + w_rl * o.iql_weight * (rl["awr_loss"] + o.iql_value_weight * (rl["value_loss"] + rl["q_loss"]))
        parts.update({k: rl[k] for k in ("value_loss", "q_loss", "awr_loss", "advantage", "v")})
    return loss, parts


def accumulate_gradients(forward, model, critic: IQLCritic | None, batch: dict[str, Any], tokens: TokenCache,
                         device: str, scale: torch.Tensor, o: OfflineParams, iql_cfg: IQLConfig,
                         dist: Distributed) -> list[dict[str, tuple[float, float]]]:
    """Back-propagate the loss of this rank's share ``batch`` in ``o.grad_accum_steps`` micro-batches.

    Each masked mean of a micro-batch is weighted by its share of the count over the global batch
    (every micro-batch of every rank), so the summed, then rank-averaged gradient is the global
    batch's. Returns, per micro-batch, each logged part as ``(value, weight)``."""
    micro = micro_batches(batch, o.grad_accum_steps)
    shares = dist.micro_shares([_loss_counts(mb, critic is not None) for mb in micro])
    logged = []
    for mb, (w_traj, w_ctrl, w_rl) in zip(micro, shares):
        if not batch_size_of(mb):       # a global batch smaller than the world: nothing here
            continue
        loss, parts = _micro_loss(forward, model, critic, mb, tokens, device, scale, o, iql_cfg, w_traj, w_ctrl, w_rl)
        loss.backward()
        weights = {"trajectory": w_traj, "trajectory_l2_m": w_traj, "control_nll": w_ctrl}
        values = torch.stack([v.detach().float() for v in parts.values()]).tolist()   # one host sync
        logged.append({k: (v, weights.get(k, w_rl)) for k, v in zip(parts, values)})
    return logged


@dataclass
class _Training:
    """What the phases of one offline run share."""
    cfg: PipelineConfig
    dist: Distributed
    device: str
    manifest: dict[str, Any]
    train_ds: ShardedDataset
    loader: Any
    scale: torch.Tensor
    model: Any
    critic: IQLCritic | None
    params: list[torch.nn.Parameter]
    optim: torch.optim.Optimizer
    tokens: TokenCache
    iql_cfg: IQLConfig
    resume: ResumePoint
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    ego_mlp: Any = None
    val: SplitArrays | None = None
    forward: Any = None
    keeper: BestPolicyKeeper | None = None

    @property
    def o(self) -> OfflineParams:
        return self.cfg.offline

    def parts(self) -> dict[str, Any]:
        return {"model": self.model, "critic": self.critic, "optim": self.optim}


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Train on this process, or as one rank of a ``torchrun`` job (data parallel, rank 0 writes)."""
    return run_on_ranks(cfg, _run)


def _run(cfg: PipelineConfig, dist: Distributed) -> dict[str, Any]:
    t = _init(cfg, dist)
    t0 = time.perf_counter()
    for epoch in range(t.start_epoch, t.o.epochs):
        _end_epoch(t, epoch, *_train_epoch(t, epoch))
    selected = t.keeper.restore() if t.keeper is not None else None   # the best-driving epoch's weights
    reports, metrics = _final_metrics(t, time.perf_counter() - t0)
    if selected is not None and selected["best_step"] >= 0:
        metrics.update(selected_epoch=selected["best_step"], val_closed_loop_route_completion=selected["best_score"])
    if dist.is_main:  # one writer: DVC's outputs, the metrics and the resume state
        _write_outputs(t, reports, metrics)
    dist.barrier()
    return {"paths": {"checkpoint": t.o.out, "plot": str(PLOT)}, "metrics": metrics}


def _read_manifest(cfg: PipelineConfig) -> dict[str, Any]:
    """The built dataset's manifest, checked against the model's trajectory length."""
    built = cfg.data.built
    manifest = read_manifest(built)
    if manifest["trajectory"]["length"] != cfg.model.trajectory_length:
        raise ValueError(f"{built} holds {manifest['trajectory']['length']}-waypoint trajectories but "
                         f"model.trajectory_length is {cfg.model.trajectory_length}: rerun the data stage")
    if manifest["stats"].get("trajectory_std") is None:
        raise DatasetError(f"{built}: no train sample has a full {manifest['trajectory']['length']}-waypoint future "
                           f"(episodes shorter than the horizon): lower data.waypoint_stride or raise "
                           f"env.max_episode_steps, then rerun the data stage")
    return manifest


def _init(cfg: PipelineConfig, dist: Distributed) -> _Training:
    """Data, model, critic and optimiser; the saved state of a killed run, or the heads' data-driven
    start; the ego-status baseline and the compiled forward. (The order keeps the RNG streams.)"""
    seed_everything(cfg.seed)
    device = dist.device(resolve_device(cfg.device))
    configure_backends(device)
    o, built = cfg.offline, cfg.data.built
    if device == "cpu" and o.cpu_threads:
        torch.set_num_threads(o.cpu_threads)
    manifest = _read_manifest(cfg)
    use_iql = o.iql_weight > 0
    train_ds = ShardedDataset(built, "train", shuffle=True, seed=cfg.seed, with_next=use_iql)
    loader = make_loader(train_ds, o.batch_size, cfg.data.num_workers, pin_memory=device.startswith("cuda"),
                         rank=dist.rank, world_size=dist.world_size)
    scale = torch.as_tensor(np.asarray(manifest["stats"]["trajectory_std"]) + 0.1, dtype=torch.float32,
                            device=device)

    model = load_or_init(cfg, upstream=cfg.pretrain.out).to(device)
    critic = (IQLCritic(model.config.hidden_dim, model.action_low.cpu(), model.action_high.cpu()).to(device)
              if use_iql else None)
    params = list(model.parameters()) + (list(critic.q.parameters()) if critic is not None else [])
    # The pretrained encoders move more slowly than the parts stage 1 did not train (fusion, state
    # encoder, heads, critic).
    pretrained = {id(p) for p in model.encoder_parameters()}
    groups = [{"params": [p for p in params if id(p) in pretrained], "lr": o.learning_rate * o.encoder_lr_scale},
              {"params": [p for p in params if id(p) not in pretrained], "lr": o.learning_rate}]
    optim = make_adamw(groups, lr=o.learning_rate, weight_decay=o.weight_decay, device=device)
    t = _Training(cfg, dist, device, manifest, train_ds, loader, scale, model, critic, params, optim,
                  TokenCache(model), iql_config(o),
                  ResumePoint("offline", fingerprint(cfg.model, cfg.data, cfg.pretrain, o, cfg.seed)))
    state = t.resume.load()
    if state is not None:
        restore(state, t.parts())
        t.start_epoch, t.history = state["epoch"], state["history"]
        log.info("%s: resuming after epoch %d of %d", "offline", t.start_epoch, o.epochs)
    # The ego-status baseline is trained on the same train split, from the state and command alone.
    train_status = load_split_arrays(built, "train", keys=("trajectories", "traj_valid", "commands", "perturbed",
                                                           "expert_actions", "action_valid"))
    if state is None:
        _init_from_data(t, train_status)
    ok = train_status.traj_valid & ~train_status.perturbed
    t.ego_mlp = fit_ego_status_mlp(train_status.states[ok], train_status.commands[ok],
                                   train_status.trajectories[ok], epochs=o.ego_mlp_epochs, seed=cfg.seed)
    t.val = load_split_arrays(built, "val")
    # Compiled: the model's forward (and so its backward); `model` itself stays plain for saving.
    t.forward = maybe_compile(fp32_forward(model), o.compile, device)
    if dist.is_main:
        dagger.prepare(o, fresh=state is None)
    dist.barrier()
    if o.select_episodes and dist.is_main:
        t.keeper = BestPolicyKeeper(model, lambda: _closed_loop_score(t), RUN_DIR, key=t.resume.key)
        if state is not None:
            t.keeper.resume()
    return t


def _closed_loop_score(t: _Training) -> float:
    """Mean route completion of the deterministic policy on the validation episodes (seeds of their own,
    apart from the held-out ones every report uses), which the keeper selects the weights on."""
    env = make_env(t.cfg.env, seed=t.cfg.seed + SELECT_SEED_OFFSET)
    try:
        return evaluate_policy(t.model, env, t.o.select_episodes, t.cfg.seed + SELECT_SEED_OFFSET,
                               device=t.device)["route_completion"]
    finally:
        env.close()
        t.model.train()


def _init_from_data(t: _Training, train: SplitArrays) -> None:
    """A fresh run: the state normalisation folded in (after stage 1) and the heads at the data's means."""
    if _upstream_stage(t.cfg.pretrain.out) == "pretrain":    # stage 1 leaves the state encoder untrained
        fold_state_normalisation(t.model, train.states.mean(0), train.states.std(0))
        t.model.set_state_normalization(torch.as_tensor(train.states.mean(0)), torch.as_tensor(train.states.std(0)))
    stats = {**t.manifest["stats"], **_action_stats(train, t.model, t.o.min_log_std)}
    init_heads(t.model, t.critic, stats, t.iql_cfg.gamma)


def _train_epoch(t: _Training, epoch: int) -> tuple[dict[str, float], int]:
    """One pass over the train split; the logged parts' sums over every rank, and the sample count."""
    o, dist = t.o, t.dist
    if o.dagger_rounds and dagger.aggregate(t.model, t.cfg, t.train_ds, epoch, t.start_epoch, t.resume.key, t.device,
                                           dist):
        t.loader = make_loader(t.train_ds, o.batch_size, t.cfg.data.num_workers,
                               pin_memory=t.device.startswith("cuda"), rank=dist.rank, world_size=dist.world_size)
    t.model.train()
    t.train_ds.set_epoch(epoch)
    sums: dict[str, float] = {}
    count = 0.0
    bar = tqdm(t.loader, desc=f"offline epoch {epoch + 1}/{o.epochs}", unit="batch",
               total=len(t.loader), disable=not dist.is_main)
    for part in bar:
        # Every rank walks the same global batches (same seed); its loader built only its own share
        # of this one, which it trains on in micro-batches; one optimiser step per global batch.
        n = part.size
        t.optim.zero_grad(set_to_none=True)
        logged = accumulate_gradients(t.forward, t.model, t.critic, to_device(part.share, t.device), t.tokens,
                                      t.device, t.scale, o, t.iql_cfg, dist)
        # Logged per-epoch means weight each term by its share, so they match one process's.
        for parts in logged:
            for k, (v, w) in parts.items():
                sums[k] = sums.get(k, 0.0) + v * w * n / dist.world_size
        if logged:
            bar.set_postfix(traj_m=f"{logged[-1]['trajectory_l2_m'][0]:.2f}",
                            nll=f"{logged[-1]['control_nll'][0]:.2f}")
        dist.average_gradients(t.params)
        torch.nn.utils.clip_grad_norm_(t.params, 1.0)
        t.optim.step()
        if t.critic is not None:
            t.critic.update_target(t.iql_cfg.tau)
        count += n / dist.world_size
    totals = dist.sum({**sums, "__count": float(count)})
    count = round(totals.pop("__count"))
    return totals, count


def _evaluate(t: _Training) -> tuple[dict[str, Any], dict[str, Any]]:
    return evaluate(t.model, t.val, {"ego_mlp": t.ego_mlp}, t.tokens, t.device,
                    t.manifest["trajectory"]["step_seconds"], t.manifest["ego_size"])


def _end_epoch(t: _Training, epoch: int, sums: dict[str, float], count: int) -> None:
    """Evaluate, log and record the epoch; save the resume state (rank 0)."""
    reports, ranking = _evaluate(t)
    first = reports.get("sim") or next(iter(reports.values()))
    t.history.append({"epoch": epoch + 1, **{f"train_{k}": v / max(count, 1) for k, v in sums.items()},
                      "val_l2_at_3s": first["model"].get("l2_at_3s"), "val_l2_avg_3s": first["model"].get("l2_avg_3s"),
                      **ranking})
    log.info("offline epoch %d: val L2@3s %.3f m (const. velocity %.3f), value AUC %.3f", epoch + 1,
             first["model"].get("l2_at_3s", float("nan")), first["const_velocity"].get("l2_at_3s", float("nan")),
             ranking["value_auc_clean_vs_perturbed"])
    if t.keeper is not None and epoch + 1 >= t.o.select_from_epoch:
        t.keeper({"global_step": epoch + 1})
        t.history[-1]["val_closed_loop_route_completion"] = t.keeper.history[-1]["score"]
    if t.dist.is_main:
        t.resume.save(snapshot(t.parts(), epoch=epoch + 1, history=t.history))


def _final_metrics(t: _Training, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The held-out open-loop reports per source and the flat metrics the stage returns."""
    reports, ranking = _evaluate(t)
    step_seconds = t.manifest["trajectory"]["step_seconds"]
    metrics: dict[str, Any] = {"horizon_seconds": round(t.cfg.model.trajectory_length * step_seconds, 6),
                               **ranking, "seconds": round(seconds, 2)}
    for source, report in reports.items():
        for planner, r in report.items():
            for k, v in r.items():
                if not isinstance(v, list):
                    metrics[f"{source}_{planner}_{k}"] = v
        log.info("open-loop, held-out %s:\n%s", source, format_table(report))
    main_source = "sim" if "sim" in reports else next(iter(reports))
    m, cv, mlp = (reports[main_source][k] for k in ("model", "const_velocity", "ego_mlp"))
    metrics.update({
        "eval_source": main_source,
        "val_l2_at_3s": m.get("l2_at_3s"), "val_l2_avg_3s": m.get("l2_avg_3s"),
        "const_velocity_l2_at_3s": cv.get("l2_at_3s"), "ego_mlp_l2_at_3s": mlp.get("l2_at_3s"),
        "beats_constant_velocity": bool(m.get("l2_at_3s", np.inf) < cv.get("l2_at_3s", -np.inf)),
        # The mean over the horizon, as the first version reported it.
        "val_l2_mean": float(np.mean(m["l2_per_time"])), "const_velocity_l2_mean": float(np.mean(cv["l2_per_time"])),
    })
    return reports, metrics


def _write_outputs(t: _Training, reports: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The plot, the checkpoint (with the IQL critic), the metrics; then the resume state goes."""
    o, metrics_dir = t.o, Path(t.cfg.metrics_dir)
    plot_open_loop(reports, PLOT)
    critic = {"iql_critic.pt": t.critic.cpu().state_dict()} if t.critic is not None else None
    save_checkpoint(t.model.cpu(), o.out, extra={"stage": "offline", "metrics": metrics,
                                                 "world_size": t.dist.world_size}, state_dicts=critic)
    write_json(metrics_dir / "offline.json", metrics)
    write_json(metrics_dir / "offline_history.json", t.history)
    write_json(metrics_dir / "offline_open_loop.json", reports)
    t.resume.clear()


def main() -> None:
    stage_main("offline", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
