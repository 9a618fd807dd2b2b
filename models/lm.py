"""The captioner's language model, behind one seam: everything the rest of the repo knows about the LM is
here. Loading (by transformers id or local directory, every failure one line), its tokenizer, its input
embeddings and context length, whether and how it cross-attends, its tied weights, the buffers older
checkpoints carry, and the key/value cache decoding steps it with. No other module names a family's
attributes.

Token layout, the same in training and in decoding for every family: the prefix (or xattn's start
embedding), then the caption's tokens without special tokens, then EOS. A tokenizer that adds a BOS token
(Llama, Mistral, OPT) does not add it: the prefix is where the text starts. One without a pad token pads
with EOS (padding is masked out of attention and loss), and EOS is whatever the tokenizer's is."""

import functools
import inspect
import re
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    EncoderDecoderCache,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from data.errors import InputError, first_line

# The families whose blocks gain cross-attention layers (config.add_cross_attention), and the weight
# names those layers add: new, so always trained and always stored.
CROSS_ATTENTION_WEIGHTS = {"gpt2": (".crossattention.", ".ln_cross_attn.")}
# Buffers that GPT-2 checkpoints from older transformers carry and current ones do not.
LEGACY_LM_BUFFERS = (".attn.bias", ".attn.masked_bias")
# A tokenizer with fewer tokens than this did not load its vocabulary (transformers 5 builds a
# vocabulary of 1 from missing files): every caption would become EOS alone and the loss 0.
MIN_VOCABULARY = 32
# The class-name endings of a model with a language-modelling head; a bare encoder (BertModel) has none.
GENERATIVE_HEADS = ("ForCausalLM", "LMHeadModel")
# A transformer LM's block index in its weight names (ClipCap's `gpt.` prefix): GPT-2's `transformer.h.N.`,
# most others' `layers.N.`, MPT's `blocks.N.`.
LM_LAYER_INDEX = re.compile(r"^gpt\..*?\.(?:h|layers?|blocks)\.(\d+)\.")
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, StrictDataclassError)


def pretrained_lm_config(name: str, cross_attention: bool = False) -> PretrainedConfig:
    """The config of the LM `name`, checked to be a generative LM (and, with `cross_attention`, one whose
    blocks can gain cross-attention layers) before any weight is read."""
    try:
        config = AutoConfig.from_pretrained(name)
    except LOAD_ERRORS as error:
        raise InputError(f"cannot load language model {name!r}: {first_line(error)}") from None
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(architecture.endswith(GENERATIVE_HEADS) for architecture in architectures):
        raise InputError(
            f"language model {name!r} is a {architectures[0]} ({config.model_type}), which has no language-modelling "
            "head; give a causal LM (a ...ForCausalLM or ...LMHeadModel)"
        )
    if cross_attention:
        if config.model_type not in CROSS_ATTENTION_WEIGHTS:
            raise InputError(
                f"language model {name!r} ({config.model_type}) has no cross-attention layers for --mapping_type xattn "
                f"(the families that have them: {', '.join(CROSS_ATTENTION_WEIGHTS)}); use a prefix mapper: "
                "--mapping_type mlp or transformer"
            )
        config.add_cross_attention = True
    return config


def load_lm(name: str, cross_attention: bool = False) -> PreTrainedModel:
    """A pretrained causal LM by transformers id or local directory; with `cross_attention`, with new
    (randomly initialized) cross-attention layers in every block, as an xattn captioner trains them."""
    config = pretrained_lm_config(name, cross_attention)
    verbosity = transformers_logging.get_verbosity()
    if cross_attention:
        transformers_logging.set_verbosity_error()  # its report lists the new layers as "missing": expected
    try:
        return AutoModelForCausalLM.from_pretrained(name, config=config)
    except (*LOAD_ERRORS, RuntimeError) as error:  # RuntimeError: weights of other shapes than the config's
        raise InputError(f"cannot load language model {name!r}: {first_line(error)}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def load_tokenizer(name: str, lm_config: PretrainedConfig | None = None) -> PreTrainedTokenizerBase:
    """The LM's tokenizer, by id or directory; one without a pad token pads with EOS (see the module's
    docstring). `lm_config`, when given, is the LM's config, so the config.json beside the tokenizer is not read."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, config=lm_config)
    except LOAD_ERRORS as error:
        raise InputError(f"cannot load tokenizer {name!r}: {first_line(error)}") from None
    if len(tokenizer) < MIN_VOCABULARY:
        raise InputError(
            f"tokenizer {name!r} has a vocabulary of {len(tokenizer)} token(s): its vocabulary files did not load "
            "(a GPT-2 tokenizer has 50257)"
        )
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer {name!r} has no EOS token, which captions end with")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unbuildable(source: str, error: BaseException) -> InputError:
    """The one line for a config no module can be built from; transformers' validation errors span lines."""
    return InputError(f"{source}: the config describes no buildable model: {' '.join(str(error).split())[:300]}")


def lm_config_object(lm_config: dict[str, Any], source: str) -> PretrainedConfig:
    """The transformers config `lm_config` describes (its aliases resolved, e.g. GPT-2's num_hidden_layers)."""
    model_type = lm_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:  # transformers' message lists them all
        raise InputError(f"{source}: the LM config's model_type {model_type!r} is not a transformers model type")
    try:
        return AutoConfig.for_model(**lm_config)
    except (KeyError, TypeError, ValueError, StrictDataclassError) as error:
        raise unbuildable(source, error) from None


def lm_from_config(lm_config: dict[str, Any], source: str) -> PreTrainedModel:
    """An LM with the architecture in `lm_config` (random weights, to be overwritten)."""
    config = lm_config_object(lm_config, source)
    try:
        return AutoModelForCausalLM.from_config(config)
    except (KeyError, TypeError, ValueError) as error:
        raise unbuildable(source, error) from None


def embedding_width(lm: PreTrainedModel) -> int:
    """The LM's input embedding width, from the model itself rather than a guess."""
    return lm.get_input_embeddings().embedding_dim


def embed_tokens(lm: PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (B, L) as the LM's input embeddings (B, L, E)."""
    return lm.get_input_embeddings()(tokens)


def context_length(lm: PreTrainedModel) -> int | None:
    """The most positions the LM takes (prefix and caption together), or None where its config sets no limit."""
    config = lm.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def has_cross_attention(lm: PreTrainedModel) -> bool:
    """Whether the LM's blocks cross-attend (an xattn captioner's LM)."""
    return bool(getattr(lm.config, "add_cross_attention", False))


def cross_attention_inputs(cross_states: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The LM's keyword for cross-attention states, only when there are some: not every causal LM takes it."""
    return {} if cross_states is None else {"encoder_hidden_states": cross_states}


def is_cross_attention_weight(name: str) -> bool:
    """Whether an LM parameter (or `gpt.*` state-dict key) belongs to a cross-attention layer."""
    return any(part in name for parts in CROSS_ATTENTION_WEIGHTS.values() for part in parts)


def tied_names(module: nn.Module) -> set[str]:
    """Names under which a parameter or buffer appears again after its first name (a tied weight, such as
    GPT-2's lm_head, which is the token embedding matrix). By identity, so it works on the meta device."""
    first_seen: set[int] = set()
    aliases = set()
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first_seen:
            aliases.add(name)
        first_seen.add(id(tensor))
    return aliases


@functools.cache
def _cache_keyword(lm_class: type) -> str:
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name is deprecated).
    # Looked up once per LM class: decoding builds rows for every batch.
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"


def cache_inputs(lm: PreTrainedModel, cache: DynamicCache | EncoderDecoderCache | None) -> dict[str, Any]:
    """The LM forward's keyword for a key/value cache, under the name this transformers gives it."""
    return {_cache_keyword(type(lm)): cache}


def new_cache(lm: PreTrainedModel) -> DynamicCache | EncoderDecoderCache:
    """An empty key/value cache for decoding with `lm`."""
    self_attention = DynamicCache(config=lm.config)
    if not has_cross_attention(lm):
        return self_attention
    # The cross-attention half is filled by the first pass and only read after: its keys and values
    # are computed once per image, and beam search repeats them per beam.
    return EncoderDecoderCache(self_attention, DynamicCache(config=lm.config))


def lm_blocks(lm: PreTrainedModel) -> nn.ModuleList:
    """The LM's stack of transformer blocks (GPT-2's `transformer.h`, Llama's `model.layers`, OPT's
    `model.decoder.layers`, ...): its ModuleList holding the most parameters, the unit --fsdp shards."""
    stacks = [module for module in lm.modules() if isinstance(module, nn.ModuleList)]
    if not stacks:
        raise InputError(f"language model {lm.config.model_type!r} has no list of blocks to shard with --fsdp")
    return max(stacks, key=lambda stack: sum(parameter.numel() for parameter in stack.parameters()))
