"""Transformer building blocks in plain torch.

Everything here keeps the batch dimension symbolic (shapes are read from the input, never
branched on), so ``torch.export`` and ``torch.onnx.export(dynamo=True)`` can trace a dynamic batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added to attention scores of padded keys. Finite (unlike -inf) so that a row whose keys are all
# padding gives a uniform softmax instead of NaN, and small enough to be exact in fp16/bf16.
MASK_BIAS = -1.0e4


def key_padding_bias(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a ``[B, L]`` bool mask (True = real token) into an additive ``[B, 1, 1, L]`` bias."""
    return (~valid).to(dtype).mul(MASK_BIAS)[:, None, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention on top of ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        batch, length, dim = x.shape
        # [B, L, 3, H, Dh] -> three [B, H, L, Dh]
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), attn_bias))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """A stack of pre-norm blocks followed by the final LayerNorm that pre-norm designs need."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, attn_bias)
        return self.norm(x)


class PatchEmbed(nn.Module):
    """ViT patchify: a stride-``patch`` convolution, ``[N, 3, H, W] -> [N, (H/p)*(W/p), dim]``."""

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module: nn.Module) -> None:
    """ViT-style init: truncated normal (std 0.02) for weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
