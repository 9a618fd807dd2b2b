"""Tiny models built from configs with random weights, saved to a directory and loaded back by
path through the same `from_pretrained` code as the real ones. The tests and the demo use them:
no download is needed."""

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
)

END_OF_TEXT = "<|endoftext|>"  # GPT-2's EOS, also its BOS and our padding


def save_tiny_clip(
    directory: str | os.PathLike,
    *,
    image_size: int = 224,
    patch_size: int = 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    projection_dim: int = 32,
    seed: int = 0,
) -> Path:
    """A CLIP vision tower with projection, as `CLIPVisionModelWithProjection` saves it."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 32),
        projection_dim=projection_dim,
    )
    directory = Path(directory)
    CLIPVisionModelWithProjection(config).save_pretrained(directory)
    return directory


def save_tiny_dinov2(
    directory: str | os.PathLike,
    *,
    image_size: int = 224,
    patch_size: int = 14,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A DINOv2 backbone, as `Dinov2Model` saves it."""
    torch.manual_seed(seed)
    config = Dinov2Config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        mlp_ratio=2,
    )
    directory = Path(directory)
    Dinov2Model(config).save_pretrained(directory)
    return directory


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> GPT2TokenizerFast:
    """A byte-level BPE (GPT-2's kind of tokenizer) trained on `texts`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=[END_OF_TEXT])
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)


def save_tiny_gpt2(
    directory: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
) -> Path:
    """A small GPT-2 and a tokenizer trained on `texts`, saved together as `gpt2` is on the hub."""
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_positions,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    directory = Path(directory)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
