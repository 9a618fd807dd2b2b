"""The captioner: a mapper turns image features into what a causal LM (GPT-2 by default) is
conditioned on, and the LM continues with the caption. Two designs:
- prefix (ClipCap, mapping types mlp and transformer): one image vector becomes a prefix of LM embeddings;
- xattn: the LM gets cross-attention layers over the projected patch tokens, and the caption follows
  a learned start embedding.
Parameter names follow ClipCap (`clip_project.*` for the mapper, `gpt.*` for the LM)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from data.errors import InputError
from models.config import CaptionerConfig
from models.lm import (
    cross_attention_inputs,
    embed_tokens,
    embedding_width,
    has_cross_attention,
    is_cross_attention_weight,
)
from models.mappers import MAPPERS

IGNORE_INDEX = -100  # label value that cross_entropy skips: padding, and nothing else


@dataclass
class CaptionerOutput:
    """What forward returns: logits over the caption tokens, and the loss when asked for."""

    logits: torch.Tensor  # (B, T, V): position t predicts token t of the caption
    loss: torch.Tensor | None = None


@dataclass
class Conditioning:
    """What the LM is conditioned on for a batch of images."""

    prefix: torch.Tensor  # (B, P, E): LM input embeddings before the caption (xattn: P = 1, the start)
    cross_states: torch.Tensor | None = None  # (B, T, E): what cross-attention attends to (xattn only)


class ClipCaptionModel(nn.Module):
    """Image features -> mapper -> LM conditioning -> caption."""

    def __init__(self, config: CaptionerConfig, lm: PreTrainedModel):
        super().__init__()
        if config.mapping_type not in MAPPERS:
            raise InputError(f"unknown mapping type {config.mapping_type!r}; choose from {', '.join(MAPPERS)}")
        if config.cross_attention != has_cross_attention(lm):
            raise InputError(
                f"mapping type {config.mapping_type!r} needs an LM "
                f"{'with' if config.cross_attention else 'without'} cross-attention layers"
            )
        self.config = config
        self.gpt = lm
        self.clip_project = MAPPERS[config.mapping_type](config, embedding_width(lm))
        if config.cross_attention:
            self._start_from_bos()
        self.lm_frozen = False

    @torch.no_grad()
    def _start_from_bos(self) -> None:
        # The caption starts where GPT-2 starts a text: after its BOS token (training then adapts it).
        embeddings = self.gpt.get_input_embeddings().weight
        bos = self.gpt.config.bos_token_id
        if bos is not None and 0 <= bos < embeddings.shape[0]:
            self.clip_project.start.copy_(embeddings[bos])
        else:
            self.clip_project.start.normal_(std=0.02)  # GPT-2's initializer range

    def freeze_lm(self) -> None:
        """Freeze the LM's own weights for real: no gradients computed or stored, eval mode (no dropout).
        Cross-attention layers are new, so they keep training."""
        self.lm_frozen = True
        for name, parameter in self.gpt.named_parameters():
            parameter.requires_grad_(is_cross_attention_weight(name))
        self.gpt.eval()

    def train(self, mode: bool = True) -> "ClipCaptionModel":
        super().train(mode)
        if self.lm_frozen:
            self.gpt.eval()  # ClipCap's --only_prefix also keeps the frozen LM in eval mode
        return self

    def condition(self, features: torch.Tensor) -> Conditioning:
        """Image features, (B, D) for a prefix mapper or (B, T, D) patch tokens for xattn, in the LM's dtype."""
        expected = 3 if self.config.cross_attention else 2
        if features.ndim != expected:
            kind = "patch tokens (B, T, D)" if self.config.cross_attention else "one vector per image (B, D)"
            raise InputError(
                f"mapping type {self.config.mapping_type!r} takes {kind}; got features of shape {tuple(features.shape)}"
            )
        if self.config.normalize_prefix:
            # In the model, not the dataset, so training and inference can never disagree.
            features = features / features.norm(p=2, dim=-1, keepdim=True)
        mapper_dtype = next(self.clip_project.parameters()).dtype
        mapped = self.clip_project(features.to(mapper_dtype))
        if not self.config.cross_attention:
            return Conditioning(prefix=mapped)  # (B, P, E)
        start = self.clip_project.start.expand(features.shape[0], 1, -1)  # (B, 1, E)
        return Conditioning(prefix=start, cross_states=mapped)  # mapped: (B, T, E)

    def forward(
        self, features: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor, compute_loss: bool = True
    ) -> CaptionerOutput:
        """Teacher-forced pass: features (B, D) or (B, T, D), tokens and attention_mask (B, L), right-padded."""
        conditioning = self.condition(features)
        prefix = conditioning.prefix  # (B, P, E)
        token_embeds = embed_tokens(self.gpt, tokens)  # (B, L, E)
        inputs_embeds = torch.cat((prefix.to(token_embeds.dtype), token_embeds), dim=1)  # (B, P+L, E)
        prefix_mask = attention_mask.new_ones(prefix.shape[:2])
        full_mask = torch.cat((prefix_mask, attention_mask), dim=1)
        # Position P-1+t predicts caption token t: only those positions go through the LM head.
        prefix_length, caption_length = prefix.shape[1], tokens.shape[1]
        predicting = torch.arange(prefix_length - 1, prefix_length + caption_length - 1, device=tokens.device)
        # use_cache=False: GPT-2 defaults to building a key/value cache that a teacher-forced pass never reads.
        logits = self.gpt(
            inputs_embeds=inputs_embeds,
            attention_mask=full_mask,
            logits_to_keep=predicting,
            use_cache=False,
            **cross_attention_inputs(conditioning.cross_states),
        ).logits
        loss = None
        if compute_loss:
            labels = tokens.masked_fill(attention_mask == 0, IGNORE_INDEX)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return CaptionerOutput(logits=logits, loss=loss)

    def trainable_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores: the mapper and any cross-attention layers, plus the whole
        LM unless it is frozen; of `state` where given (a sharded model's, gathered), else of state_dict()."""
        state = self.state_dict() if state is None else state
        if self.config.lm_in_checkpoint:
            return state
        return {
            name: tensor
            for name, tensor in state.items()
            if not name.startswith("gpt.") or is_cross_attention_weight(name)
        }
