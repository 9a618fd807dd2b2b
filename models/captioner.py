"""The captioner: a mapper turns image features into what an LM (GPT-2 by default) is conditioned on,
and the LM writes the caption. Two designs:
- prefix (ClipCap, mapping types mlp and transformer): one image vector becomes a prefix of LM embeddings;
- xattn: the LM cross-attends to the projected patch tokens, and the caption follows a learned start
  embedding.
Two layouts of the LM, chosen once: a causal LM continues the prefix (xattn: through cross-attention
layers it gains); an encoder-decoder (T5, BART) encodes the prefix and an optional text prompt, and its
decoder writes the caption from its start token (xattn: the patch tokens stand in for the encoder's output).
Parameter names follow ClipCap (`clip_project.*` for the mapper, `gpt.*` for the LM)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from data.errors import InputError
from models.config import CaptionerConfig
from models.lm import (
    checkpoint_in_eval_mode,
    context_length,
    embed_tokens,
    embedding_dtype,
    embedding_width,
    encode,
    encoder_own_parameters,
    has_cross_attention,
    input_embedding_matrix,
    is_adapter_weight,
    is_cross_attention_weight,
    is_encoder_decoder,
    lm_logits,
    load_tokenizer,
    start_token_id,
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

    prefix: torch.Tensor  # (B, P, E): the LM's sequence before the caption (xattn, encoder-decoder: P = 1, the start)
    cross_states: torch.Tensor | None = None  # (B, T, E): what cross-attention attends to (xattn, encoder-decoder)


class DecoderOnly(nn.Module):
    """A causal LM's layout: the prefix mapper's P embeddings start the LM's sequence."""

    def __init__(self, config: CaptionerConfig, lm: PreTrainedModel):
        super().__init__()
        if config.cross_attention != has_cross_attention(lm):
            raise InputError(
                f"mapping type {config.mapping_type!r} needs an LM "
                f"{'with' if config.cross_attention else 'without'} cross-attention layers"
            )
        if config.prompt:
            raise InputError(
                f"--prompt {config.prompt!r}: a prompt is an encoder-decoder's encoder input (T5, BART); "
                f"{lm.config.model_type} is a causal LM"
            )
        self.lead_length = config.prefix_length

    def prefix_conditioning(self, lm: PreTrainedModel, mapped: torch.Tensor) -> Conditioning:
        """The mapped prefix (B, P, E) as the LM's conditioning."""
        return Conditioning(prefix=mapped)


class EncoderDecoder(nn.Module):
    """An encoder-decoder LM's layout (T5, BART): the prefix, then the prompt's token embeddings, are the
    encoder's input; the decoder's sequence starts with its decoder start token and cross-attends to the
    encoder's output, which is computed once per image. (xattn: the patch tokens stand in for that output.)"""

    lead_length = 1  # the decoder start token

    def __init__(self, config: CaptionerConfig, lm: PreTrainedModel):
        super().__init__()
        if start_token_id(lm) is None:
            raise InputError(f"the {lm.config.model_type} LM's config names no decoder_start_token_id")
        self.start_id = start_token_id(lm)
        if config.cross_attention:
            # xattn never runs the encoder: weights without gradients must not train (nor keep DDP waiting).
            for parameter in encoder_own_parameters(lm):
                parameter.requires_grad_(False)
        ids = []
        if config.prompt:
            if config.cross_attention:
                raise InputError("--prompt: --mapping_type xattn does not run the encoder the prompt is input to")
            ids = load_tokenizer(config.lm_name, lm.config)(config.prompt, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InputError(f"--prompt {config.prompt!r} is no tokens for the LM's tokenizer")
        positions = context_length(lm)
        if not config.cross_attention and positions is not None and config.prefix_length + len(ids) > positions:
            raise InputError(
                f"--prefix_length {config.prefix_length} and the prompt's {len(ids)} tokens exceed the LM encoder's "
                f"{positions} positions"
            )
        # Not stored in checkpoints: the config's prompt text is, and makes them again.
        self.register_buffer("prompt_ids", torch.tensor(ids, dtype=torch.long), persistent=False)  # (K,)

    def encoder_input(self, lm: PreTrainedModel, mapped: torch.Tensor) -> torch.Tensor:
        """The encoder's input embeddings: the prefix (B, P, E), then the prompt's (K, E). (B, P+K, E)"""
        prompt = embed_tokens(lm, self.prompt_ids).expand(mapped.shape[0], -1, -1)  # (B, K, E)
        return torch.cat((mapped.to(prompt.dtype), prompt), dim=1)

    def prefix_conditioning(self, lm: PreTrainedModel, mapped: torch.Tensor) -> Conditioning:
        """The decoder start token's embedding, and the encoder's output for the prefix and prompt."""
        start = torch.full((mapped.shape[0], 1), self.start_id, dtype=torch.long, device=mapped.device)
        return Conditioning(prefix=embed_tokens(lm, start), cross_states=encode(lm, self.encoder_input(lm, mapped)))


class ClipCaptionModel(nn.Module):
    """Image features -> mapper -> LM conditioning -> caption."""

    def __init__(self, config: CaptionerConfig, lm: PreTrainedModel):
        super().__init__()
        if config.mapping_type not in MAPPERS:
            raise InputError(f"unknown mapping type {config.mapping_type!r}; choose from {', '.join(MAPPERS)}")
        self.layout = (EncoderDecoder if is_encoder_decoder(lm) else DecoderOnly)(config, lm)
        self.config = config
        self.gpt = lm
        self.clip_project = MAPPERS[config.mapping_type](config, embedding_width(lm))
        if config.cross_attention:
            self._start_from_bos()
        self.lm_frozen = False

    @torch.no_grad()
    def _start_from_bos(self) -> None:
        # The caption starts where the LM starts a text: after GPT-2's BOS token, or T5's decoder start
        # (training then adapts it).
        embeddings = input_embedding_matrix(self.gpt)  # (V, E)
        bos = start_token_id(self.gpt)
        if bos is not None and 0 <= bos < embeddings.shape[0]:
            self.clip_project.start.copy_(embeddings[bos])
        else:
            self.clip_project.start.normal_(std=0.02)  # GPT-2's initializer range

    @property
    def positions_before_caption(self) -> int:
        """Positions of the LM's sequence before the caption: the prefix, or the start (xattn, encoder-decoder)."""
        return self.layout.lead_length

    def trains_with_lm_frozen(self, name: str) -> bool:
        """Whether an LM weight (its name in the LM, or its `gpt.*` key) trains, and is stored, even with the LM
        frozen: xattn's cross-attention layers (a causal LM's new ones, an encoder-decoder's decoder's own) and
        LoRA adapters."""
        return (self.config.cross_attention and is_cross_attention_weight(name)) or is_adapter_weight(name)

    def freeze_lm(self) -> None:
        """Freeze the LM's own weights for real: no gradients computed or stored. xattn's cross-attention layers
        and LoRA adapters keep training. Without adapters the LM stays in eval mode (no dropout, as ClipCap's
        --only_prefix); with them it follows the model's mode, as peft's fine-tuning does, so the adapters'
        dropout works."""
        for name, parameter in self.gpt.named_parameters():
            parameter.requires_grad_(self.trains_with_lm_frozen(name))
        self.lm_frozen = self.config.lora is None  # held in eval mode
        self.train(self.training)

    def train(self, mode: bool = True) -> "ClipCaptionModel":
        super().train(mode)
        if self.lm_frozen:
            self.gpt.eval()  # ClipCap's --only_prefix also keeps the frozen LM in eval mode
            if mode:
                checkpoint_in_eval_mode(self.gpt)
        return self

    def map_features(self, features: torch.Tensor) -> torch.Tensor:
        """The mapper's output for image features, (B, D) for a prefix mapper or (B, T, D) patch tokens for
        xattn: the prefix (B, P, E), or the projected patch tokens (B, T, E)."""
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
        return self.clip_project(features.to(mapper_dtype))

    def condition(self, features: torch.Tensor) -> Conditioning:
        """What the LM is conditioned on for image features (see map_features)."""
        mapped = self.map_features(features)
        if not self.config.cross_attention:
            return self.layout.prefix_conditioning(self.gpt, mapped.to(embedding_dtype(self.gpt)))  # in the LM's dtype
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
        # Position P-1+t predicts caption token t: only those positions go through the LM head. (For an
        # encoder-decoder, P = 1: the decoder's input is the caption shifted right behind its start token.)
        prefix_length, caption_length = prefix.shape[1], tokens.shape[1]
        predicting = torch.arange(prefix_length - 1, prefix_length + caption_length - 1, device=tokens.device)
        logits = lm_logits(  # no cache: a teacher-forced pass never reads one
            self.gpt, inputs_embeds, predicting, attention_mask=full_mask, cross_states=conditioning.cross_states
        )
        loss = None
        if compute_loss:
            labels = tokens.masked_fill(attention_mask == 0, IGNORE_INDEX)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return CaptionerOutput(logits=logits, loss=loss)

    def trainable_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores: the mapper, any cross-attention layers and LoRA adapters, plus the
        whole LM unless it is frozen; of `state` where given (a sharded model's, gathered), else of state_dict()."""
        state = self.state_dict() if state is None else state
        if self.config.lm_in_checkpoint:
            return state
        return {
            name: tensor
            for name, tensor in state.items()
            if not name.startswith("gpt.") or self.trains_with_lm_frozen(name)
        }
