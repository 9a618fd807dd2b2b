"""The captioner's language model, behind one seam: everything the rest of the repo knows about the LM is
here. Loading (by transformers id or local directory, every failure one line), its tokenizer, its input
embeddings and context length, whether and how it cross-attends, its tied weights, the buffers older
checkpoints carry, the key/value cache decoding steps it with, how one pass runs it (`lm_logits`), the
weight dtype it loads in, gradient checkpointing, and which of its modules LoRA adapts. No other module
names a family's attributes.

Two layouts: a causal LM (GPT-2, Llama, ...) continues a sequence of embeddings; an encoder-decoder LM
(T5, Flan-T5, T0, BART) encodes one and its decoder writes the caption from its decoder start token,
cross-attending to the encoder's output. Either way the sequence that produces the caption is "the
LM's sequence" here: the causal LM's input, or the decoder's.

Token layout, the same in training and in decoding for every family: the prefix (or xattn's start
embedding, or an encoder-decoder's decoder start), then the caption's tokens without special tokens, then
EOS. For an encoder-decoder that is T5's own training layout: labels = caption + EOS, the decoder's input
the labels shifted right behind the decoder start token. A tokenizer that adds a BOS token
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
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    EncoderDecoderCache,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import logging as transformers_logging

from data.errors import InputError, first_line

# The causal families whose blocks gain cross-attention layers (config.add_cross_attention), and the weight
# names those layers add: new, so always trained and always stored.
CROSS_ATTENTION_WEIGHTS = {"gpt2": (".crossattention.", ".ln_cross_attn.")}
# An encoder-decoder's decoder cross-attends already: xattn trains (and stores) these pretrained layers even
# with --only_prefix, as they now read patch tokens. T5's cross-attention norm (decoder `layer.1.layer_norm`)
# shares its name with the encoder's feed-forward norm, so it stays with the frozen LM.
ENCODER_DECODER_CROSS_ATTENTION_WEIGHTS = {
    "t5": (".EncDecAttention.",),
    "bart": (".encoder_attn.", ".encoder_attn_layer_norm."),
}
# Buffers that GPT-2 checkpoints from older transformers carry and current ones do not.
LEGACY_LM_BUFFERS = (".attn.bias", ".attn.masked_bias")
# A tokenizer with fewer tokens than this did not load its vocabulary (transformers 5 builds a
# vocabulary of 1 from missing files): every caption would become EOS alone and the loss 0.
MIN_VOCABULARY = 32
# The class-name endings of a model with a language-modelling head; a bare encoder (BertModel) has none.
GENERATIVE_HEADS = ("ForCausalLM", "LMHeadModel")
SEQ2SEQ_HEAD = "ForConditionalGeneration"  # an encoder-decoder's (T5's, BART's); also a Llava's, which is no LM
# A transformer LM's stack and block index in its weight names (ClipCap's `gpt.` prefix): GPT-2's
# `transformer.h.N.`, most others' `layers.N.`, MPT's `blocks.N.`; T5's `encoder.block.N.` and
# `decoder.block.N.`, BART's `model.encoder.layers.N.` and `model.decoder.layers.N.`.
LM_LAYER_INDEX = re.compile(r"^gpt\.(.*?)\.(?:h|layers?|blocks?)\.(\d+)\.")
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, StrictDataclassError)
# --lm_dtype's names (models.config.LM_DTYPES) as torch dtypes.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# LoRA's default targets (--lora_targets): each family's attention projections, as module-name endings
# (peft matches a name that is, or ends with ".", the target). GPT-2's "attn." keeps its MLP's c_proj and
# an xattn captioner's cross-attention (trained whole) out; GPT-NeoX's and Phi's MLPs have no bare "dense".
LORA_TARGETS = {
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "self_attn.dense"),
    "t5": ("q", "k", "v", "o"),  # self- and cross-attention alike (the feed-forward's are wi, wo)
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
# Families whose projections are transformers' Conv1D, which stores its weight (in, out): LoRA must know.
CONV1D_FAMILIES = ("gpt2",)
# The weight-name parts of LoRA adapters (peft's names, adapter "default"): new, so trained and stored.
ADAPTER_WEIGHTS = (".lora_A.", ".lora_B.")


def pretrained_lm_config(name: str, cross_attention: bool = False) -> PretrainedConfig:
    """The config of the LM `name`, checked to be a generative LM (and, with `cross_attention`, one whose
    blocks can gain cross-attention layers) before any weight is read."""
    try:
        config = AutoConfig.from_pretrained(name)
    except LOAD_ERRORS as error:
        raise InputError(f"cannot load language model {name!r}: {first_line(error)}") from None
    architectures = getattr(config, "architectures", None) or []
    heads = (*GENERATIVE_HEADS, SEQ2SEQ_HEAD) if config.is_encoder_decoder else GENERATIVE_HEADS
    if architectures and not any(architecture.endswith(heads) for architecture in architectures):
        raise InputError(
            f"language model {name!r} is a {architectures[0]} ({config.model_type}), which has no language-modelling "
            "head; give a causal LM (a ...ForCausalLM or ...LMHeadModel) or an encoder-decoder (T5, BART)"
        )
    if cross_attention and not config.is_encoder_decoder:  # an encoder-decoder's decoder has its own
        if config.model_type not in CROSS_ATTENTION_WEIGHTS:
            raise InputError(
                f"language model {name!r} ({config.model_type}) has no cross-attention layers for --mapping_type xattn "
                f"(the families that have them: {', '.join(CROSS_ATTENTION_WEIGHTS)}, and encoder-decoders such as "
                f"{' and '.join(ENCODER_DECODER_CROSS_ATTENTION_WEIGHTS)}); use a prefix mapper: "
                "--mapping_type mlp or transformer"
            )
        config.add_cross_attention = True
    return config


def lm_class(config: PretrainedConfig) -> type:
    """The auto class that builds the LM of `config`: causal, or sequence-to-sequence for an encoder-decoder."""
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_lm(name: str, cross_attention: bool = False, dtype: str = "fp32") -> PreTrainedModel:
    """A pretrained LM by transformers id or local directory, its weights in `dtype` (a TORCH_DTYPES key);
    with `cross_attention`, a causal one gains new (randomly initialized) cross-attention layers in every
    block, as an xattn captioner trains them (an encoder-decoder's decoder has its own)."""
    config = pretrained_lm_config(name, cross_attention)
    verbosity = transformers_logging.get_verbosity()
    if cross_attention:
        transformers_logging.set_verbosity_error()  # its report lists the new layers as "missing": expected
    try:
        return lm_class(config).from_pretrained(name, config=config, dtype=TORCH_DTYPES[dtype])
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


def lm_from_config(lm_config: dict[str, Any], source: str, dtype: str = "fp32") -> PreTrainedModel:
    """An LM with the architecture in `lm_config` (random weights, to be overwritten), its weights in `dtype`."""
    config = lm_config_object(lm_config, source)
    try:
        return lm_class(config).from_config(config, dtype=TORCH_DTYPES[dtype])
    except (KeyError, TypeError, ValueError) as error:
        raise unbuildable(source, error) from None


def embedding_width(lm: PreTrainedModel) -> int:
    """The LM's input embedding width, from the model itself rather than a guess."""
    return lm.get_input_embeddings().embedding_dim


def embedding_dtype(lm: PreTrainedModel) -> torch.dtype:
    """The dtype of the LM's input embeddings: what a prefix must be to join them."""
    return input_embedding_matrix(lm).dtype


def input_embedding_matrix(lm: PreTrainedModel) -> torch.Tensor:
    """The LM's input embedding matrix (V, E): row v is token v's embedding."""
    return lm.get_input_embeddings().weight


def embed_tokens(lm: PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (B, L) as the LM's input embeddings (B, L, E)."""
    return lm.get_input_embeddings()(tokens)


def context_length(lm: PreTrainedModel) -> int | None:
    """The most positions the LM's sequence takes (prefix and caption together; an encoder-decoder's encoder
    input and its decoder's sequence each), or None where its config sets no limit (T5: relative positions)."""
    config = lm.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def is_encoder_decoder(lm: PreTrainedModel) -> bool:
    """Whether the LM is an encoder-decoder (T5, BART) rather than a causal LM."""
    return bool(getattr(lm.config, "is_encoder_decoder", False))


def has_cross_attention(lm: PreTrainedModel) -> bool:
    """Whether the LM's blocks cross-attend: an encoder-decoder's decoder, or a causal LM that was given
    cross-attention layers (an xattn captioner's)."""
    return is_encoder_decoder(lm) or bool(getattr(lm.config, "add_cross_attention", False))


def start_token_id(lm: PreTrainedModel) -> int | None:
    """The token the LM's sequence starts a text with: an encoder-decoder's decoder start (T5's is its pad
    token), a causal LM's BOS; None where the config names none."""
    config = lm.config
    return config.decoder_start_token_id if is_encoder_decoder(lm) else config.bos_token_id


def encode(lm: PreTrainedModel, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """An encoder-decoder's encoder output (B, S, E) for input embeddings (B, S, E), every position attended."""
    return lm.get_encoder()(inputs_embeds=inputs_embeds).last_hidden_state


def encoder_own_parameters(lm: PreTrainedModel) -> list[nn.Parameter]:
    """An encoder-decoder's encoder parameters that the decoder does not share (T5's and BART's token
    embeddings are shared, so not among them)."""
    shared = {id(parameter) for parameter in lm.get_decoder().parameters()}
    return [parameter for parameter in lm.get_encoder().parameters() if id(parameter) not in shared]


def lm_logits(
    lm: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    keep: int | torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    cross_states: torch.Tensor | None = None,
    cache: DynamicCache | EncoderDecoderCache | None = None,
) -> torch.Tensor:
    """The logits at positions `keep` (an int: the last ones; a tensor (K,): those) of the LM's sequence
    `inputs_embeds` (B, L, E), with its attention mask (B, L), the states it cross-attends to (B, T, E):
    a causal LM's added layers' or an encoder-decoder's encoder output, and a key/value cache that grows
    (None: no cache is built). (B, K, V)"""
    running = {"use_cache": cache is not None, **cache_inputs(lm, cache)}
    if not is_encoder_decoder(lm):
        if cross_states is not None:  # not every causal LM takes the keyword
            running["encoder_hidden_states"] = cross_states
        return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, logits_to_keep=keep, **running).logits
    # T5's and BART's seq2seq heads take no logits_to_keep: all positions' logits, then those kept. The
    # encoder's output is given, so the encoder does not run (it ran once per image, or xattn has none).
    logits = lm(
        decoder_inputs_embeds=inputs_embeds,
        decoder_attention_mask=attention_mask,
        encoder_outputs=BaseModelOutput(last_hidden_state=cross_states),
        **running,
    ).logits
    return slice_logits_to_keep(logits, keep)


def is_cross_attention_weight(name: str) -> bool:
    """Whether an LM parameter (or `gpt.*` state-dict key) belongs to a cross-attention layer (GPT-2's added
    ones, or an encoder-decoder's decoder's own)."""
    tables = (CROSS_ATTENTION_WEIGHTS, ENCODER_DECODER_CROSS_ATTENTION_WEIGHTS)
    return any(part in name for table in tables for parts in table.values() for part in parts)


def layer_count(config: PretrainedConfig) -> int | None:
    """The blocks the LM config declares (an encoder-decoder's encoder and decoder blocks together), or None."""
    layers = getattr(config, "num_hidden_layers", None)  # an encoder-decoder's encoder's
    if not isinstance(layers, int) or not config.is_encoder_decoder:
        return layers if isinstance(layers, int) else None
    decoder_layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    return layers + decoder_layers if isinstance(decoder_layers, int) else None


def is_adapter_weight(name: str) -> bool:
    """Whether an LM parameter (or `gpt.*` state-dict key) belongs to a LoRA adapter."""
    return any(part in name for part in ADAPTER_WEIGHTS)


def lora_targets(model_type: str, lm_name: str) -> list[str]:
    """The default LoRA targets of the LM's family: its attention projections."""
    if model_type not in LORA_TARGETS:
        raise InputError(
            f"--lora_r: no default LoRA targets for {lm_name!r} ({model_type}; known: {', '.join(LORA_TARGETS)}); "
            "name its attention projections with --lora_targets"
        )
    return list(LORA_TARGETS[model_type])


def enable_gradient_checkpointing(lm: PreTrainedModel) -> None:
    """Recompute each block's activations in backward instead of storing them. Non-reentrant: the reentrant
    kind passes gradients only to inputs that require them, and a frozen LM's blocks would get none, so
    the prefix (the mapper) would not learn."""
    arguments = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers 5.25's name; the old one warns there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=arguments)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=arguments)


def checkpoint_in_eval_mode(lm: PreTrainedModel) -> None:
    """Let a frozen LM's blocks checkpoint although the LM is in eval mode (no dropout): transformers
    checkpoints a block only while its `training` is set, so it is set on the blocks alone, not on the
    dropout and attention modules inside them. Without gradient checkpointing this changes nothing."""
    for module in lm.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


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
def _cache_keyword(model_class: type) -> str:
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name is deprecated).
    # Looked up once per LM class: decoding builds rows for every batch.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_inputs(lm: PreTrainedModel, cache: DynamicCache | EncoderDecoderCache | None) -> dict[str, Any]:
    """The LM forward's keyword for a key/value cache, under the name this transformers gives it."""
    return {_cache_keyword(type(lm)): cache}


def new_cache(lm: PreTrainedModel) -> DynamicCache | EncoderDecoderCache:
    """An empty key/value cache for decoding with `lm`."""
    self_attention = DynamicCache(config=lm.config)
    if not has_cross_attention(lm):
        return self_attention
    # The cross-attention half (GPT-2's added layers', or an encoder-decoder's decoder's) is filled by the
    # first pass and only read after: its keys and values are computed once per image, and beam search
    # repeats them per beam.
    return EncoderDecoderCache(self_attention, DynamicCache(config=lm.config))


def lm_blocks(lm: PreTrainedModel) -> nn.ModuleList:
    """The LM's stack of transformer blocks (GPT-2's `transformer.h`, Llama's `model.layers`, OPT's
    `model.decoder.layers`, ...): its ModuleList holding the most parameters, the unit --fsdp shards."""
    stacks = [module for module in lm.modules() if isinstance(module, nn.ModuleList)]
    if not stacks:
        raise InputError(f"language model {lm.config.model_type!r} has no list of blocks to shard with --fsdp")
    return max(stacks, key=lambda stack: sum(parameter.numel() for parameter in stack.parameters()))


def select_cache_rows(
    cache: DynamicCache | EncoderDecoderCache, rows: torch.Tensor, cross_attention_unchanged: bool = False
) -> None:
    """Keep (and reorder to) `rows` of a decoding cache. `cross_attention_unchanged`: every row stays among
    its image's rows, whose cross-attention keys and values are all the same, so only the self-attention
    half moves; moving the rest for every beam at every step would copy (rows x layers x encoder positions)
    of them a token, more than the step itself costs."""
    if cross_attention_unchanged and isinstance(cache, EncoderDecoderCache):
        cache.self_attention_cache.batch_select_indices(rows)
    else:
        cache.batch_select_indices(rows)
