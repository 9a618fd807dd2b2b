"""The text discriminator of unpaired training (CgT-GAN): any transformers encoder (RoBERTa-base in the
paper) with a small MLP head on its first token's state, one logit per text: above 0, it judges the text a
corpus sentence (real), below, a sampled caption (fake)."""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from data.errors import InputError, first_line


class TextDiscriminator(nn.Module):
    """An encoder and an MLP head on its first token (RoBERTa's <s>, BERT's [CLS]): texts -> logits (N,)."""

    def __init__(self, encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, hidden_size: int, max_tokens: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def tokenize(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (N, T) on `device`, padded, cut to the encoder's positions."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        return self.head(states[:, 0]).squeeze(-1)  # (N,)


def load_discriminator(name: str) -> TextDiscriminator:
    """The encoder `name` (a transformers id or directory, with its tokenizer) and a fresh head, drawn from
    torch's global RNG; anything that is not an encoder with a tokenizer is one line naming --discriminator."""
    try:
        config = AutoConfig.from_pretrained(name)
        if getattr(config, "is_encoder_decoder", False):
            raise InputError(f"--discriminator {name}: an encoder-decoder ({config.model_type}); give a text encoder")
        encoder = AutoModel.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"--discriminator {name}: cannot load an encoder and its tokenizer ({first_line(error)})") from None
    if tokenizer.pad_token is None:
        raise InputError(f"--discriminator {name}: its tokenizer has no pad token")
    # RoBERTa's positions start after its padding index: two fewer than max_position_embeddings hold tokens
    # (BERT loses two it could use, harmless for captions).
    positions = getattr(config, "max_position_embeddings", None)
    max_tokens = min(tokenizer.model_max_length, positions - 2) if positions else tokenizer.model_max_length
    return TextDiscriminator(encoder, tokenizer, config.hidden_size, max_tokens)
