"""Mappers from image features to what the LM is conditioned on: ClipCap's prefix mappers (one
feature -> `prefix_length` LM embeddings, with ClipCap's architecture and parameter names, so its
checkpoints load here and ours load there), and the projection of patch tokens that an LM with
cross-attention layers attends to."""

import torch
import torch.nn.functional as F
from torch import nn

from models.config import CaptionerConfig


class MLPMapper(nn.Module):
    """ClipCap's MLP: Linear(D, E*P/2) -> Tanh -> Linear(E*P/2, E*P), reshaped to (P, E)."""

    def __init__(self, config: CaptionerConfig, embed_dim: int):
        super().__init__()
        self.prefix_length = config.prefix_length
        self.embed_dim = embed_dim
        output_dim = embed_dim * config.prefix_length
        # Named `model` and indexed 0/2 as ClipCap's nn.Sequential, for its state-dict keys.
        self.model = nn.Sequential(
            nn.Linear(config.feature_dim, output_dim // 2), nn.Tanh(), nn.Linear(output_dim // 2, output_dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features).view(-1, self.prefix_length, self.embed_dim)  # (B, P, E)


class MultiHeadAttention(nn.Module):
    """ClipCap's self-attention (keys and values from one projection), computed with SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        queries = self.to_queries(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        # ClipCap's layout: the projection's output is (2, heads, head_dim), keys first.
        keys_values = self.to_keys_values(x).view(batch, length, 2, self.num_heads, head_dim)
        keys = keys_values[:, :, 0].transpose(1, 2)  # (B, H, L, Dh)
        values = keys_values[:, :, 1].transpose(1, 2)
        attended = F.scaled_dot_product_attention(queries, keys, values)  # no mask: all tokens see all
        return self.project(attended.transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Module):
    """fc1 -> ReLU -> fc2, as ClipCap's MlpTransformer."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of TransformerLayer under ClipCap's name `layers`."""

    def __init__(self, dim: int, num_heads: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: the feature becomes `prefix_length_clip` tokens, a learned
    constant adds `prefix_length` more, and the transformer's last P outputs are the prefix."""

    def __init__(self, config: CaptionerConfig, embed_dim: int):
        super().__init__()
        self.clip_length = config.prefix_length_clip
        self.embed_dim = embed_dim
        self.linear = nn.Linear(config.feature_dim, config.prefix_length_clip * embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, embed_dim))
        self.transformer = Transformer(embed_dim, num_heads=8, num_layers=config.num_layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image_tokens = self.linear(features).view(features.shape[0], self.clip_length, self.embed_dim)
        constant = self.prefix_const.unsqueeze(0).expand(features.shape[0], -1, -1)
        tokens = torch.cat((image_tokens, constant), dim=1)  # (B, clip_length + P, E)
        return self.transformer(tokens)[:, self.clip_length :]  # (B, P, E)


class CrossAttentionProjection(nn.Module):
    """xattn: patch tokens (B, T, D) -> LM-width states (B, T, E) for the LM's cross-attention layers.
    There is no image prefix: the caption follows one learned start embedding, `start` (1, E)."""

    def __init__(self, config: CaptionerConfig, embed_dim: int):
        super().__init__()
        # CLIP's last hidden states come before its final LayerNorm, DINOv2's after: normalizing here
        # gives the projection the same scale whichever encoder made the tokens.
        self.norm = nn.LayerNorm(config.feature_dim)
        self.linear = nn.Linear(config.feature_dim, embed_dim)
        self.start = nn.Parameter(torch.zeros(1, embed_dim))  # the captioner sets it to the LM's BOS embedding

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))  # (B, T, E)


MAPPERS = {"mlp": MLPMapper, "transformer": TransformerMapper, "xattn": CrossAttentionProjection}
# The mappers of ClipCap's own weights (predict.py --weights).
PREFIX_MAPPERS = ("mlp", "transformer")
