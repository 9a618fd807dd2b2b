"""ClipCap's model classes and training step, re-implemented faithfully from its `train.py`
(rmokady/CLIP_prefix_caption) as the baseline of the benchmarks and the other side of the
compatibility tests. Kept as ClipCap wrote them, quirks included:
- captions padded to one fixed length (`max_seq_len`), padding written as token 0;
- the loss ignores token 0, so GPT-2's "!" is never learned (ours ignores padding only);
- fp32, and `ClipCaptionPrefix` hides the LM from the optimizer but still computes its gradients
  (and, as its `parameters()` also hides them from `zero_grad`, accumulates them step after step).
One change: the LM is passed in (ClipCap calls `GPT2LMHeadModel.from_pretrained('gpt2')`), as these
machines have no hub access. Not imported by the package: only by bench/ and tests/."""

from enum import Enum

import torch
import torch.nn.functional as nnf
from torch import nn
from transformers import PreTrainedModel


class MappingType(Enum):
    MLP = "mlp"
    Transformer = "transformer"


def pad_tokens(tokens: torch.Tensor, max_seq_len: int, prefix_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ClipCocoDataset.pad_tokens without its write-back: pad with -1 (or cut) to max_seq_len, then 0s
    where padding was; the mask covers the prefix and the real tokens. Returns tokens (T,), mask (P+T,)."""
    padding = max_seq_len - tokens.shape[0]
    if padding > 0:
        tokens = torch.cat((tokens, torch.zeros(padding, dtype=torch.int64) - 1))
    elif padding < 0:
        tokens = tokens[:max_seq_len]
    mask = tokens.ge(0)
    tokens = tokens.clone()
    tokens[~mask] = 0
    mask = torch.cat((torch.ones(prefix_length), mask.float()), dim=0)
    return tokens, mask


def max_seq_len(lengths: torch.Tensor) -> int:
    """ClipCap's fixed caption length: mean + 10 std of the token counts, at most the longest."""
    lengths = lengths.float()
    return min(int(lengths.mean() + lengths.std() * 10), int(lengths.max()))


class MLP(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def __init__(self, sizes: tuple[int, ...], bias: bool = True, act: type[nn.Module] = nn.Tanh):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim: int, h_dim: int, out_d: int | None = None, act=nnf.relu, dropout: float = 0.0):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.act = act
        self.fc2 = nn.Linear(h_dim, out_d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.dropout(x)
        x = self.fc2(x)
        x = self.dropout(x)
        return x


class MultiHeadAttention(nn.Module):
    def __init__(self, dim_self: int, dim_ref: int, num_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim_self // num_heads
        self.scale = head_dim**-0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, y=None, mask=None):
        y = y if y is not None else x
        b, n, c = x.shape
        _, m, d = y.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)  # b n h dh
        keys_values = self.to_keys_values(y).reshape(b, m, 2, self.num_heads, c // self.num_heads)  # b m 2 h dh
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.unsqueeze(1)
            attention = attention.masked_fill(mask.unsqueeze(3), float("-inf"))
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
        out = self.project(out)
        return out, attention


class TransformerLayer(nn.Module):
    def forward(self, x, y=None, mask=None):
        x = x + self.attn(self.norm1(x), y, mask)[0]
        x = x + self.mlp(self.norm2(x))
        return x

    def __init__(
        self,
        dim_self,
        dim_ref,
        num_heads,
        mlp_ratio=4.0,
        bias=False,
        dropout=0.0,
        act=nnf.relu,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_ref, num_heads, bias=bias, dropout=dropout)
        self.norm2 = norm_layer(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio), act=act, dropout=dropout)


class Transformer(nn.Module):
    def __init__(
        self,
        dim_self: int,
        num_heads: int,
        num_layers: int,
        dim_ref: int | None = None,
        mlp_ratio: float = 2.0,
        act=nnf.relu,
        norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        dim_ref = dim_ref if dim_ref is not None else dim_self
        # ClipCap's enc_dec branch (cross-attention layers) is never used by its mappers and is left out.
        self.layers = nn.ModuleList(
            TransformerLayer(dim_self, dim_ref, num_heads, mlp_ratio, act=act, norm_layer=norm_layer)
            for _ in range(num_layers)
        )

    def forward(self, x, y=None, mask=None):
        for layer in self.layers:
            x = layer(x, y, mask)
        return x


class TransformerMapper(nn.Module):
    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        prefix = torch.cat((x, prefix), dim=1)
        out = self.transformer(prefix)[:, self.clip_length :]
        return out

    def __init__(self, dim_clip: int, dim_embedding: int, prefix_length: int, clip_length: int, num_layers: int = 8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)


class ClipCaptionModel(nn.Module):
    def get_dummy_token(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch_size, self.prefix_length, dtype=torch.int64, device=device)

    def forward(
        self,
        tokens: torch.Tensor,
        prefix: torch.Tensor,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        embedding_text = self.gpt.transformer.wte(tokens)
        prefix_projections = self.clip_project(prefix).view(-1, self.prefix_length, self.gpt_embedding_size)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        if labels is not None:
            dummy_token = self.get_dummy_token(tokens.shape[0], tokens.device)
            labels = torch.cat((dummy_token, tokens), dim=1)
        out = self.gpt(inputs_embeds=embedding_cat, labels=labels, attention_mask=mask)
        return out

    def __init__(
        self,
        prefix_length: int,
        gpt: PreTrainedModel,
        clip_length: int | None = None,
        prefix_size: int = 512,
        num_layers: int = 8,
        mapping_type: MappingType = MappingType.MLP,
    ):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = gpt
        self.gpt_embedding_size = self.gpt.transformer.wte.weight.shape[1]
        if mapping_type == MappingType.MLP:
            self.clip_project = MLP(
                (prefix_size, (self.gpt_embedding_size * prefix_length) // 2, self.gpt_embedding_size * prefix_length)
            )
        else:
            self.clip_project = TransformerMapper(
                prefix_size, self.gpt_embedding_size, prefix_length, clip_length, num_layers
            )


class ClipCaptionPrefix(ClipCaptionModel):
    def parameters(self, recurse: bool = True):
        return self.clip_project.parameters()

    def train(self, mode: bool = True):
        super().train(mode)
        self.gpt.eval()
        return self


def clipcap_loss(
    model: ClipCaptionModel, tokens: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    """The loss of ClipCap's training loop: logits of the caption positions, token 0 ignored."""
    outputs = model(tokens, prefix, mask)
    logits = outputs.logits[:, model.prefix_length - 1 : -1]
    return nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)


def clipcap_train_step(
    model: ClipCaptionModel, optimizer: torch.optim.Optimizer, scheduler, tokens, mask, prefix
) -> float:
    """One iteration of ClipCap's train(): zero_grad, forward, loss, backward, step, schedule."""
    model.zero_grad()
    loss = clipcap_loss(model, tokens, mask, prefix.to(dtype=torch.float32))
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()
