"""The captioner: a mapper turns an image feature into a prefix of LM embeddings, and a causal LM
(GPT-2 by default) continues it with the caption. Parameter names follow ClipCap
(`clip_project.*` for the mapper, `gpt.*` for the LM)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from data.errors import InputError
from models.config import CaptionerConfig
from models.mappers import MAPPERS

IGNORE_INDEX = -100  # label value that cross_entropy skips: padding, and nothing else


@dataclass
class CaptionerOutput:
    """What forward returns: logits over the caption tokens, and the loss when asked for."""

    logits: torch.Tensor  # (B, T, V): position t predicts token t of the caption
    loss: torch.Tensor | None = None


def lm_embedding_width(lm: PreTrainedModel) -> int:
    """The LM's input embedding width, from the model itself rather than a guess."""
    return lm.get_input_embeddings().embedding_dim


class ClipCaptionModel(nn.Module):
    """Image feature -> mapper -> LM prefix -> caption."""

    def __init__(self, config: CaptionerConfig, lm: PreTrainedModel):
        super().__init__()
        if config.mapping_type not in MAPPERS:
            raise InputError(f"unknown mapping type {config.mapping_type!r}; choose from {', '.join(MAPPERS)}")
        self.config = config
        self.gpt = lm
        self.clip_project = MAPPERS[config.mapping_type](config, lm_embedding_width(lm))
        self.lm_frozen = False

    def freeze_lm(self) -> None:
        """Freeze the LM for real: no gradients computed or stored, eval mode (no dropout)."""
        self.lm_frozen = True
        self.gpt.requires_grad_(False)
        self.gpt.eval()

    def train(self, mode: bool = True) -> "ClipCaptionModel":
        super().train(mode)
        if self.lm_frozen:
            self.gpt.eval()  # ClipCap's --only_prefix also keeps the frozen LM in eval mode
        return self

    def embed_prefix(self, features: torch.Tensor) -> torch.Tensor:
        """Image features (B, D) -> prefix embeddings (B, P, E), in the LM's dtype."""
        if self.config.normalize_prefix:
            # In the model, not the dataset, so training and inference can never disagree.
            features = features / features.norm(p=2, dim=-1, keepdim=True)
        mapper_dtype = next(self.clip_project.parameters()).dtype
        return self.clip_project(features.to(mapper_dtype))

    def forward(
        self, features: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor, compute_loss: bool = True
    ) -> CaptionerOutput:
        """Teacher-forced pass: features (B, D), tokens and attention_mask (B, T), right-padded."""
        prefix = self.embed_prefix(features)  # (B, P, E)
        token_embeds = self.gpt.get_input_embeddings()(tokens)  # (B, T, E)
        inputs_embeds = torch.cat((prefix.to(token_embeds.dtype), token_embeds), dim=1)  # (B, P+T, E)
        prefix_mask = attention_mask.new_ones(prefix.shape[:2])
        full_mask = torch.cat((prefix_mask, attention_mask), dim=1)
        # Position P-1+t predicts caption token t: only those positions go through the LM head.
        prefix_length, caption_length = prefix.shape[1], tokens.shape[1]
        predicting = torch.arange(prefix_length - 1, prefix_length + caption_length - 1, device=tokens.device)
        # use_cache=False: GPT-2 defaults to building a key/value cache that a teacher-forced pass never reads.
        logits = self.gpt(
            inputs_embeds=inputs_embeds, attention_mask=full_mask, logits_to_keep=predicting, use_cache=False
        ).logits
        loss = None
        if compute_loss:
            labels = tokens.masked_fill(attention_mask == 0, IGNORE_INDEX)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return CaptionerOutput(logits=logits, loss=loss)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores: the mapper, plus the LM unless it is frozen."""
        state = self.state_dict()
        if self.config.lm_in_checkpoint:
            return state
        return {name: tensor for name, tensor in state.items() if not name.startswith("gpt.")}
