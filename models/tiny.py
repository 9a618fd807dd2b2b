"""Tiny models built from configs with random weights, saved to a directory and loaded back by
path through the same `from_pretrained` code as the real ones. The tests and the demo use them:
no download is needed."""

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    PreTrainedTokenizerFast,
)

END_OF_TEXT = "<|endoftext|>"  # GPT-2's EOS, also its BOS and our padding; CLIP's EOS
PAD = "<pad>"  # the tiny encoder-decoders' padding (T5's decoder start), distinct from EOS as in T5 and BART
START_OF_TEXT = "<|startoftext|>"  # CLIP's BOS


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


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> CLIPTokenizer:
    """A CLIP tokenizer (BPE with `</w>` word ends over byte-level characters) trained on `texts`."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[START_OF_TEXT, END_OF_TEXT],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    state = json.loads(bpe.to_str())["model"]
    # The trainer numbers tokens of equal count (the word-end characters "a</w>", merges that tie) in hash
    # order, which differs from run to run; numbered in sorted order, the same texts give the same ids, so
    # the same seed gives the same model.
    tokens = [START_OF_TEXT, END_OF_TEXT, *sorted(set(state["vocab"]) - {START_OF_TEXT, END_OF_TEXT})]
    # CLIPTokenizer(vocab=dict, merges=list of pairs) survives save_pretrained and AutoTokenizer.
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)}, merges=[tuple(pair) for pair in state["merges"]]
    )


def save_tiny_clip_model(
    directory: str | os.PathLike,
    texts: Iterable[str],
    *,
    image_size: int = 224,
    patch_size: int = 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    projection_dim: int = 32,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """A whole CLIP (vision and text towers, as `CLIPModel` saves it) and a tokenizer trained on `texts`."""
    tokenizer = train_clip_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 4,
        "num_hidden_layers": num_layers,
        "num_attention_heads": max(1, hidden_size // 32),
    }
    text_config = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**tower, "image_size": image_size, "patch_size": patch_size}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    directory = Path(directory)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
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
    model_vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """A small GPT-2 and a tokenizer trained on `texts`, saved together as `gpt2` is on the hub.
    `model_vocab_size` (default: the tokenizer's) widens the embedding and head, e.g. to GPT-2's 50257."""
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=max(len(tokenizer), model_vocab_size or 0),
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


# Each causal family's config keys for a tiny size: width 64, 2 blocks, 4 heads, 128 positions.
TINY_LM_SIZES = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "rotary_dim": 8},
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                 "max_position_embeddings": 128},
    "opt": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128,
            "max_position_embeddings": 128, "word_embed_proj_dim": 64},
    "llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 128},
    "qwen2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 128},
    "mistral": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 128, "max_position_embeddings": 128, "sliding_window": None},
    "phi": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "max_position_embeddings": 128},
}  # fmt: skip


# Each family's special tokens as its hub tokenizer has them: Llama 2 and Mistral add a BOS `<s>` and end
# with `</s>`, with no pad token; OPT adds `</s>` as its BOS and pads with `<pad>`; Qwen2 has no BOS.
# The rest are GPT-2's: `<|endoftext|>` for all three.
FAMILY_SPECIAL_TOKENS = {
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "opt": {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "qwen2": {"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT},
}
ADDS_BOS = ("llama", "mistral", "opt")  # the families whose tokenizers put BOS before every text


def train_family_tokenizer(texts: Iterable[str], family: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` with `family`'s special tokens, adding its BOS where it does."""
    specials = FAMILY_SPECIAL_TOKENS.get(family)
    if specials is None:
        return train_tokenizer(texts, vocab_size)
    distinct = list(dict.fromkeys(specials.values()))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=distinct)
    if family in ADDS_BOS:
        bos = specials["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)


def save_tiny_causal_lm(directory: str | os.PathLike, family: str, texts: Iterable[str], seed: int = 0) -> Path:
    """A tiny causal LM of `family` (a TINY_LM_SIZES key, transformers' model_type) with random weights and
    a byte-level tokenizer trained on `texts` with the family's special tokens, saved together as a hub model is."""
    tokenizer = train_family_tokenizer(texts, family)
    torch.manual_seed(seed)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **ids, **TINY_LM_SIZES[family])
    directory = Path(directory)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Each encoder-decoder family's config keys for a tiny size: width 64, 2 encoder and 2 decoder blocks, 4 heads.
TINY_SEQ2SEQ_SIZES = {
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32},
    "bart": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
             "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
             "max_position_embeddings": 128, "forced_eos_token_id": None},
}  # fmt: skip


def save_tiny_seq2seq_lm(directory: str | os.PathLike, family: str, texts: Iterable[str], seed: int = 0) -> Path:
    """A tiny encoder-decoder LM of `family` (a TINY_SEQ2SEQ_SIZES key) with random weights and the byte-level
    tokenizer trained on `texts` plus a pad token, saved together as a hub model is. Its special ids are set
    as the family's are: T5's decoder starts from its pad token, BART's from its EOS."""
    tokenizer = train_tokenizer(texts)
    tokenizer.add_special_tokens({"pad_token": PAD})
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = {"eos_token_id": eos, "pad_token_id": pad, "decoder_start_token_id": pad if family == "t5" else eos}
    if family == "bart":
        ids["bos_token_id"] = eos
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **ids, **TINY_SEQ2SEQ_SIZES[family])
    directory = Path(directory)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


ROBERTA_SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>"}


def save_tiny_text_encoder(directory: str | os.PathLike, texts: Iterable[str], seed: int = 0) -> Path:
    """A tiny RoBERTa encoder (width 32, 2 layers, 66 positions) with random weights and a byte-level BPE
    trained on `texts` that wraps each text in <s> ... </s> as RoBERTa's does, saved together as a hub model is."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=512, min_frequency=1, special_tokens=list(ROBERTA_SPECIAL_TOKENS.values()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **ROBERTA_SPECIAL_TOKENS)
    torch.manual_seed(seed)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 66}
    config = AutoConfig.for_model("roberta", vocab_size=len(tokenizer), **ids, **sizes)
    directory = Path(directory)
    AutoModel.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
