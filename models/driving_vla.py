"""DrivingVLA: camera images + ego state + a text command -> controls, waypoints and a value.

Layout (D = hidden_dim)::

    image  -> ViT per camera (shared weights) -> CLS + 2x2-pooled patch tokens per camera
    tokens -> byte-level text transformer     -> masked mean               -> 1 text token
    state  -> MLP                             -> 1 state token
    [readout | vision | text | state] -> fusion transformer -> readout = features [B, D]
    features -> policy head (action_params), trajectory head (waypoints), value head

The forward pass is export-friendly: no Python branching on the batch size and no data-dependent
shapes, so ``torch.export`` and ``torch.onnx.export(dynamo=True)`` accept a dynamic batch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.config import DrivingVLAConfig
from models.distributions import (
    ACTION_HIGH,
    ACTION_LOW,
    LOG_STD_MAX,
    LOG_STD_MIN,
    ActionDistribution,
    make_distribution,
)
from models.layers import MLP, PatchEmbed, TransformerEncoder, init_weights, key_padding_bias
from models.tokenizer import TOKENIZER_FILE, VOCAB_SIZE, ByteTokenizer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# ImageNet statistics: the usual choice for a ViT trained from scratch or fine-tuned.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

# Initial std of the squashed Gaussian in pre-tanh space (exp(-0.5) = 0.61): wide enough for
# on-policy exploration without pushing much mass onto the action bounds.
INIT_LOG_STD = -0.5


class DrivingVLAOutput(NamedTuple):
    """Output of :meth:`DrivingVLA.forward` (a NamedTuple so export treats it as a plain tuple)."""

    action_params: tuple[Tensor, Tensor]  # (loc, log_std) or (alpha, beta), each [B, 3]
    trajectory: Tensor  # [B, T, 2] waypoints in metres, ego frame: x forward, y left
    value: Tensor  # [B]
    features: Tensor  # [B, hidden_dim]


class VisionEncoder(nn.Module):
    """ViT over each camera with shared weights; a camera embedding tells the cameras apart."""

    def __init__(self, cfg: DrivingVLAConfig) -> None:
        super().__init__()
        dim, grid = cfg.hidden_dim, cfg.grid_size
        self.num_cameras = cfg.num_cameras
        self.image_size = cfg.image_size
        self.grid = grid
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.camera_embed = nn.Parameter(torch.zeros(cfg.num_cameras, 1, dim))
        self.encoder = TransformerEncoder(dim, cfg.vision_layers, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
        # Non-persistent: constants, not weights, so they stay out of model.safetensors.
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        # Fusion sees 2x2-pooled patches (4x fewer tokens) when the grid allows it.
        self.pool_patches = grid % 2 == 0
        pooled = (grid // 2) ** 2 if self.pool_patches else grid * grid
        self.tokens_per_camera = 1 + pooled

    def _as_cameras(self, image: Tensor) -> Tensor:
        """Accept ``[B, H, W, 3]`` (one camera) or ``[B, N, H, W, 3]``; return ``[B, N, H, W, 3]``."""
        if image.dim() == 4:
            if self.num_cameras != 1:
                raise ValueError(
                    f"image has shape {tuple(image.shape)} (one camera) but num_cameras is "
                    f"{self.num_cameras}; pass [B, {self.num_cameras}, H, W, 3]"
                )
            image = image.unsqueeze(1)
        if image.dim() != 5 or tuple(image.shape[1:]) != (
            self.num_cameras, self.image_size, self.image_size, 3
        ):
            raise ValueError(
                f"image must be uint8 [B, {self.num_cameras}, {self.image_size}, {self.image_size}, 3]"
                f" (or [B, H, W, 3] for one camera), got {tuple(image.shape)}"
            )
        return image

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Return per-camera CLS tokens ``[B, N, D]`` and fusion tokens ``[B, N * tokens_per_camera, D]``."""
        image = self._as_cameras(image)
        n, size, dim = self.num_cameras, self.image_size, self.pos_embed.shape[-1]
        # uint8 NHWC -> normalised float NCHW, one row per (sample, camera).
        x = image.reshape(-1, size, size, 3).permute(0, 3, 1, 2).to(self.mean.dtype)
        x = (x / 255.0 - self.mean) / self.std
        x = self.patch_embed(x)  # [B*N, P, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x.reshape(-1, n, x.shape[1], dim) + self.camera_embed  # camera embedding broadcasts over B
        x = self.encoder(x.reshape(-1, x.shape[2], dim))  # [B*N, 1+P, D]

        cls = x[:, 0]
        patches = x[:, 1:]
        if self.pool_patches:
            grid = patches.transpose(1, 2).reshape(-1, dim, self.grid, self.grid)
            patches = F.avg_pool2d(grid, kernel_size=2).flatten(2).transpose(1, 2)
        tokens = torch.cat([cls.unsqueeze(1), patches], dim=1)
        return cls.reshape(-1, n, dim), tokens.reshape(-1, n * self.tokens_per_camera, dim)


class TextEncoder(nn.Module):
    """Byte-token transformer; padding (id 0) is masked out of attention and of the mean pool."""

    def __init__(self, cfg: DrivingVLAConfig) -> None:
        super().__init__()
        self.max_length = cfg.max_text_length
        self.token_embed = nn.Embedding(VOCAB_SIZE, cfg.hidden_dim, padding_idx=0)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_text_length, cfg.hidden_dim))
        self.encoder = TransformerEncoder(
            cfg.hidden_dim, cfg.text_layers, cfg.num_heads, cfg.mlp_ratio, cfg.dropout
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens`` int64 ``[B, L]`` with ``L <= max_text_length`` -> pooled ``[B, D]``."""
        if tokens.dim() != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(
                f"tokens must be int64 [B, L] with L <= max_text_length ({self.max_length}), "
                f"got {tuple(tokens.shape)}"
            )
        valid = tokens != 0
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        x = self.encoder(x, key_padding_bias(valid, x.dtype))
        weights = valid.unsqueeze(-1).to(x.dtype)
        # clamp: an all-padding row pools to zeros instead of dividing by zero.
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class DrivingVLA(nn.Module):
    """Driving vision-language-action model. See ``docs/contracts.md`` (models/) for the interface."""

    def __init__(self, config: DrivingVLAConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = ByteTokenizer(config.max_text_length)
        dim, cfg = config.hidden_dim, config

        self.vision = VisionEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.state_encoder = MLP(cfg.state_dim, dim, dim)
        # The fusion transformer passes little of the state token to the readout (a linear probe of the
        # features recovers a fraction of what the raw state tells about the expert's controls); a skip
        # from the normalised state to the features gives every head a direct view of it.
        self.state_skip = nn.Linear(cfg.state_dim, dim) if cfg.state_skip else None
        # Token types in the fusion sequence: 0 readout, 1 vision, 2 text, 3 state.
        self.readout_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.type_embed = nn.Parameter(torch.zeros(4, dim))
        self.fusion = TransformerEncoder(dim, cfg.fusion_layers, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)

        self.policy_head = MLP(dim, dim, 2 * cfg.action_dim)
        # The trajectory head reads the ego state directly beside the fused features: how far the
        # path reaches is set by the speed, which one state token among many in the fusion blurs.
        self.trajectory_head = MLP(dim + cfg.state_dim, dim, 2 * cfg.trajectory_length)
        self.value_head = MLP(dim, dim, 1)
        # An optional fusion of the critic's own (see `add_critic_fusion`); None: the value head reads
        # the policy's features.
        self.critic_fusion: TransformerEncoder | None = (
            TransformerEncoder(dim, cfg.fusion_layers, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
            if cfg.critic_fusion else None)

        # Contrastive (CLIP-style) projections and temperature.
        self.image_projection = nn.Linear(dim, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))

        # Normalisation of the state for the trajectory head; persistent, so it is saved with the
        # weights (set from the training data by the offline stage).
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))
        self.register_buffer("state_keep", torch.ones(cfg.state_dim), persistent=False)
        self.ignore_state(cfg.ignored_state)
        times = cfg.waypoint_seconds * torch.arange(1, cfg.trajectory_length + 1, dtype=torch.float32)
        self.register_buffer("waypoint_times", times, persistent=False)
        self.register_buffer("action_low", torch.tensor(ACTION_LOW), persistent=False)
        self.register_buffer("action_high", torch.tensor(ACTION_HIGH), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        self.apply(init_weights)
        if self.state_skip is not None:    # starts as no change to the features; training opens it
            nn.init.zeros_(self.state_skip.weight)
            nn.init.zeros_(self.state_skip.bias)
        for p in (self.vision.pos_embed, self.vision.cls_token, self.vision.camera_embed,
                  self.text.pos_embed, self.readout_token, self.type_embed):
            nn.init.trunc_normal_(p, std=0.02)
        # Small last layers: the policy starts near the centre of the box with std exp(INIT_LOG_STD)
        # (or a broad Beta), and waypoints/values start near zero instead of at random scales.
        for head in (self.policy_head, self.trajectory_head, self.value_head):
            nn.init.trunc_normal_(head.fc2.weight, std=0.001)
        if self.config.policy == "squashed_gaussian":
            nn.init.constant_(self.policy_head.fc2.bias[self.config.action_dim:], INIT_LOG_STD)

    # ------------------------------------------------------------------ encoders

    def fusion_sequence(self, vision_tokens: Tensor, text_features: Tensor, state: Tensor) -> Tensor:
        """The fusion transformer's input ``[B, 1 + P + 2, hidden_dim]``: the readout token, then the
        vision, text and state tokens, each with its type embedding."""
        dtype = self.readout_token.dtype
        state_token = self.state_encoder((state * self.state_keep).to(dtype)).unsqueeze(1)
        batch = vision_tokens.shape[0]
        return torch.cat(
            [
                self.readout_token.expand(batch, -1, -1) + self.type_embed[0],
                vision_tokens.to(dtype) + self.type_embed[1],
                text_features.to(dtype).unsqueeze(1) + self.type_embed[2],
                state_token + self.type_embed[3],
            ],
            dim=1,
        )

    def compute_features(self, image: Tensor, state: Tensor, tokens: Tensor) -> Tensor:
        """Fused observation features ``[B, hidden_dim]`` (what the policy and trajectory heads read)."""
        _, vision_tokens = self.vision(image)
        return self.fuse(self.fusion_sequence(vision_tokens, self.text(tokens), state), state)

    def fuse(self, sequence: Tensor, state: Tensor) -> Tensor:
        """The features ``[B, hidden_dim]``: the fusion transformer's readout of ``sequence``, plus the
        normalised state through the skip when the model has one."""
        features = self.fusion(sequence)[:, 0]
        if self.state_skip is not None:
            features = features + self.state_skip(self.normalized_state(state).to(features.dtype))
        return features

    def normalized_state(self, state: Tensor) -> Tensor:
        """The state standardised by the training data's statistics, ignored entries zero."""
        return (state - self.state_mean) / self.state_std * self.state_keep

    def critic_value(self, sequence: Tensor, features: Tensor) -> Tensor:
        """``V [B]``: the value head over the policy's ``features``, or over the critic's own fusion
        of ``sequence`` when the model has one."""
        if self.critic_fusion is not None:
            features = self.critic_fusion(sequence)[:, 0]
        return self.value_head(features).squeeze(-1)

    @torch.no_grad()
    def add_critic_fusion(self) -> None:
        """Give the value head a fusion transformer of its own, starting as a copy of the policy's.

        With one shared fusion, every step that fits the critic also moves the policy; a fine-tuning
        run that starts from an imitation checkpoint (whose critic does not know the online reward)
        then either moves the policy on noise or fits only the value head, which learns the returns'
        mean but not what tells a good state from a bad one. A no-op when the model has one already."""
        if self.critic_fusion is None:
            self.critic_fusion = copy.deepcopy(self.fusion)
            self.config.critic_fusion = True

    def encode_image(self, image: Tensor) -> Tensor:
        """L2-normalised image embedding ``[B, embed_dim]`` (mean of the cameras' CLS tokens)."""
        cls, _ = self.vision(image)
        return F.normalize(self.image_projection(cls.mean(1)), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """L2-normalised text embedding ``[B, embed_dim]``."""
        return F.normalize(self.text_projection(self.text(tokens)), dim=-1)

    def contrastive_logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """CLIP logits ``[B_img, B_txt]``: cosine similarity times ``exp(logit_scale)`` clamped at 100."""
        return self.logit_scale.exp().clamp(max=100.0) * image_embeds @ text_embeds.t()

    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        """Tokenise on the model's device."""
        return self.tokenizer.encode(texts).to(self.logit_scale.device)

    # ------------------------------------------------------------------ heads

    def policy_params(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, log_std)`` (log_std clamped) or ``(alpha, beta)`` (both >= 1), each ``[B, 3]``."""
        first, second = self.policy_head(features).chunk(2, dim=-1)
        if self.config.policy == "squashed_gaussian":
            return first, second.clamp(LOG_STD_MIN, LOG_STD_MAX)
        # Concentrations >= 1 keep the Beta unimodal with a bounded density (a well-defined mode).
        return 1.0 + F.softplus(first), 1.0 + F.softplus(second)

    @torch.no_grad()
    def set_log_std(self, value: float) -> None:
        """Make the squashed Gaussian's log-std ``value`` for every state (RL then learns it again).

        A policy cloned from a nearly deterministic expert keeps the spread that imitation floored
        it at; on a fast road that much steering noise ends most episodes early, so on-policy RL
        would learn about a much worse driver than the deterministic one it is meant to improve."""
        if self.config.policy != "squashed_gaussian":
            raise ValueError(f"set_log_std needs the squashed_gaussian policy, not {self.config.policy!r}")
        dim = self.config.action_dim
        self.policy_head.fc2.weight[dim:].zero_()
        self.policy_head.fc2.bias[dim:].fill_(float(value))

    def add_state_skip(self) -> None:
        """Give a model built without it the state skip (zero, so the outputs do not change)."""
        if self.state_skip is None:
            ref = self.state_encoder.fc1.weight
            self.state_skip = nn.Linear(self.config.state_dim, self.config.hidden_dim).to(ref.device, ref.dtype)
            nn.init.zeros_(self.state_skip.weight)
            nn.init.zeros_(self.state_skip.bias)
            self.config.state_skip = True

    def ignore_state(self, indices: list[int]) -> None:
        """Read the state entries at ``indices`` as zero from now on (and say so in the config).

        A policy that sees its own last action learns to repeat it — in expert drives the next steer is
        mostly the last one — and in closed loop then keeps whatever it started with (the copycat
        problem of imitation with action history, Wen et al. 2020)."""
        self.config.ignored_state = sorted(set(indices))
        with torch.no_grad():
            self.state_keep.fill_(1.0)
            self.state_keep[self.config.ignored_state] = 0.0

    def set_state_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Mean and spread of the ego state in the training data (std floored at 1e-2)."""
        with torch.no_grad():
            self.state_mean.copy_(torch.as_tensor(mean, dtype=self.state_mean.dtype))
            self.state_std.copy_(torch.as_tensor(std, dtype=self.state_std.dtype).clamp(min=1e-2))

    def trajectory_prior(self, state: Tensor) -> Tensor:
        """``[B, T, 2]``: straight ahead at the current speed (``state[:, 0]``), or zeros."""
        batch = state.shape[0]
        if self.config.trajectory_prior == "none":
            return state.new_zeros(batch, self.config.trajectory_length, 2)
        x = state[:, :1].to(self.waypoint_times.dtype) * self.waypoint_times
        return torch.stack([x, torch.zeros_like(x)], dim=-1)

    def predict_trajectory(self, features: Tensor, state: Tensor) -> Tensor:
        """Waypoints ``[B, T, 2]``: the prior plus per-step offsets that are summed up, so the path
        is continuous and each waypoint only corrects the previous one."""
        norm = self.normalized_state(state).to(features.dtype)
        offsets = self.trajectory_head(torch.cat([features, norm], dim=-1))
        offsets = offsets.reshape(-1, self.config.trajectory_length, 2)
        return offsets.cumsum(dim=1) + self.trajectory_prior(state).to(offsets.dtype)

    def forward(self, image: Tensor, state: Tensor, tokens: Tensor) -> DrivingVLAOutput:
        _, vision_tokens = self.vision(image)
        sequence = self.fusion_sequence(vision_tokens, self.text(tokens), state)
        features = self.fuse(sequence, state)
        return DrivingVLAOutput(
            action_params=self.policy_params(features),
            trajectory=self.predict_trajectory(features, state),
            value=self.critic_value(sequence, features),
            features=features,
        )

    def distribution(self, action_params: tuple[Tensor, Tensor]) -> ActionDistribution:
        """The action distribution of ``config.policy`` over ``ACTION_LOW .. ACTION_HIGH``."""
        return make_distribution(self.config.policy, action_params, self.action_low, self.action_high)

    # ------------------------------------------------------------------ RL helpers

    def act(
        self, image: Tensor, state: Tensor, tokens: Tensor, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(action [B, 3], log_prob [B], value [B])``. The action is a sample (or the mode) and
        carries no gradient; wrap rollouts in ``torch.no_grad()`` so no graph is kept."""
        out = self(image, state, tokens)
        dist = self.distribution(out.action_params)
        action = dist.mode().detach() if deterministic else dist.sample()
        return action, dist.log_prob(action), out.value

    def evaluate_actions(
        self, image: Tensor, state: Tensor, tokens: Tensor, actions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(log_prob [B], entropy [B], value [B])`` of given actions (PPO update)."""
        out = self(image, state, tokens)
        dist = self.distribution(out.action_params)
        return dist.log_prob(actions), dist.entropy(), out.value

    # ------------------------------------------------------------------ parameter groups
    # Which parameters each objective moves, said once here: stage 1 trains the encoders (and their
    # contrastive projections), RL's actor loss the policy head, the critic loss the value head
    # (and the critic's own fusion, when there is one). The trunk is the rest: state encoder,
    # fusion, readout and type tokens, trajectory head.
    ENCODER_MODULES = ("vision", "text", "image_projection", "text_projection", "logit_scale")
    ACTOR_MODULES = ("policy_head",)
    CRITIC_MODULES = ("value_head", "critic_fusion")

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter in one group (``encoders``, ``actor``, ``critic``, ``trunk``), each group in
        ``named_parameters`` order (so an optimiser built from a group sees the usual order)."""
        groups: dict[str, list[nn.Parameter]] = {"encoders": [], "actor": [], "critic": [], "trunk": []}
        for name, p in self.named_parameters():
            module = name.split(".", 1)[0]
            group = ("encoders" if module in self.ENCODER_MODULES else "actor" if module in self.ACTOR_MODULES
                     else "critic" if module in self.CRITIC_MODULES else "trunk")
            groups[group].append(p)
        return groups

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The vision and text encoders' parameters and their contrastive projections (stage 1's)."""
        return self.parameter_groups()["encoders"]

    def freeze_encoders(self) -> int:
        """Stop training the encoders (``requires_grad=False``); returns how many parameters froze."""
        frozen = 0
        for p in self.encoder_parameters():
            p.requires_grad_(False)
            frozen += p.numel()
        return frozen

    # ------------------------------------------------------------------ persistence

    def count_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` into ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        self.tokenizer.save(path)
        logger.info("saved DrivingVLA (%d parameters) to %s", self.count_parameters(), path)
        return path

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> DrivingVLA:
        """Load what :meth:`save_pretrained` wrote; the model comes back in eval mode on ``map_location``."""
        path = Path(directory)
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a complete DrivingVLA checkpoint: missing {', '.join(missing)}"
            )
        config = _read_file(path / CONFIG_FILE, lambda f: DrivingVLAConfig.model_validate(json.loads(f.read_text())))
        model = cls(config)
        # A truncated or damaged file, or one of another model: the error names it and how to get it back.
        _read_file(path / WEIGHTS_FILE, lambda f: model.load_state_dict(load_file(str(f), device="cpu"), strict=True))
        model.tokenizer = _read_file(path / TOKENIZER_FILE, lambda f: ByteTokenizer.load(f.parent))
        if model.tokenizer.max_length != config.max_text_length:
            raise ValueError(
                f"{path / TOKENIZER_FILE}: max_length {model.tokenizer.max_length} does not match "
                f"config max_text_length {config.max_text_length}"
            )
        logger.info("loaded DrivingVLA from %s", path)
        return model.to(map_location).eval()


class CheckpointFileError(ValueError):
    """A file of a saved DrivingVLA that cannot be read; the message names it and what to do."""


_T = TypeVar("_T")


def _read_file(file: Path, read: Callable[[Path], _T]) -> _T:
    """``read(file)``, any failure to parse it turned into a :class:`CheckpointFileError` naming it."""
    try:
        return read(file)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, json and pydantic fail in their own ways
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CheckpointFileError(
            f"{file} is truncated, corrupt or of another model ({type(exc).__name__}: {detail}): re-run the "
            f"stage that writes it, or restore it with `dvc checkout {file.parent}` (`dvc pull` if it is "
            f"not in the local cache)") from exc
