"""The continuation model: a transformer that reads T latent frames and predicts the next T frames.

    input  x  [B, 128, T]   normalised EnCodec latents of frames [s, s + T)
    output y  [B, 128, T]   normalised prediction of frames [s + T, s + 2T)

Every input frame is known, so attention is bidirectional over the context (no causal mask); output
position t is the model's guess for frame s + T + t. The prediction is made in one pass (not
autoregressively), which is what the loss on the decoded audio of the whole next window needs.

    h0 = W_in x_t + P_t                       (P: sinusoidal positions, any T works)
    h  = L pre-norm transformer blocks (self-attention + GELU MLP, 4 x d_model wide)
    y  = W_out LayerNorm(h)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from music_continuation.codec import LATENT_DIM


def sinusoidal_positions(length: int, d_model: int, device=None) -> torch.Tensor:
    """P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(t / 10000^(2i/d))  ->  [length, d_model]."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
                          * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table


class ContinuationTransformer(nn.Module):
    """Latents [B, latent_dim, T] (normalised) -> prediction of the next T frames [B, latent_dim, T]."""

    def __init__(self, latent_dim: int = LATENT_DIM, d_model: int = 512, num_layers: int = 8,
                 num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if d_model % num_heads != 0 or d_model % 2 != 0:
            raise ValueError(f"d_model ({d_model}) must be even and divisible by num_heads ({num_heads})")
        # Everything needed to rebuild the module; checkpoints store it as "model_config".
        self.config = dict(latent_dim=latent_dim, d_model=d_model, num_layers=num_layers,
                           num_heads=num_heads, dropout=dropout)
        self.input_projection = nn.Linear(latent_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward=4 * d_model, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # Pre-norm blocks train stably without warm-up tricks; nested tensors only matter for padding masks.
        self.blocks = nn.TransformerEncoder(block, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d_model)
        self.output_projection = nn.Linear(d_model, latent_dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 3 or latents.shape[1] != self.config["latent_dim"]:
            raise ValueError(f"expected latents [B, {self.config['latent_dim']}, T], got {list(latents.shape)}")
        x = latents.transpose(1, 2)                                    # [B, T, latent_dim]
        h = self.input_projection(x)
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device).to(h.dtype)
        h = self.blocks(self.dropout(h))
        y = self.output_projection(self.final_norm(h))                 # [B, T, latent_dim]
        return y.transpose(1, 2)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
