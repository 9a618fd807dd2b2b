"""LoRA adapters on the captioner's LM (peft): added in place, so the LM stays the transformers model it was
and its adapters' weights sit under its own names (`...attn.c_attn.lora_A.default.weight`, the base weight
as `...attn.c_attn.base_layer.weight`); merged into the LM's weights for an export, which then needs no peft.
The spec is CaptionerConfig.lora: {"r", "alpha", "dropout", "targets"}; which modules a family's default
targets are is the LM seam's (models/lm.py)."""

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from data.errors import InputError, first_line
from models.lm import CONV1D_FAMILIES, is_adapter_weight

ADAPTER_NAME = "default"  # peft's; it is part of every adapter weight's name, so it never changes


def targeted(lm: PreTrainedModel, target: str) -> list[str]:
    """The LM's modules a target names, as peft matches them: the whole name, or its ending after a dot."""
    return [name for name, _ in lm.named_modules() if name == target or name.endswith(f".{target}")]


def add_adapters(lm: PreTrainedModel, spec: dict, lm_name: str) -> PreTrainedModel:
    """Add fresh LoRA adapters to `lm` in place (A random, B zero: the LM computes what it did) and freeze
    every other weight of it. The adapters are fp32 whatever the LM's dtype: they train, as the mapper does."""
    for target in spec["targets"]:
        if not targeted(lm, target):
            raise InputError(
                f"--lora_targets {target}: no module of {lm_name!r} ({lm.config.model_type}) is named so or ends "
                "with it (e.g. q_proj, attn.c_attn)"
            )
    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=list(spec["targets"]),
        fan_in_fan_out=lm.config.model_type in CONV1D_FAMILIES,
        bias="none",
    )
    try:
        inject_adapter_in_model(config, lm, adapter_name=ADAPTER_NAME)
    except ValueError as error:  # a target peft cannot adapt, e.g. a whole attention block
        raise InputError(f"--lora_targets {' '.join(spec['targets'])}: {first_line(error)}") from None
    for name, parameter in lm.named_parameters():
        if is_adapter_weight(name):
            parameter.data = parameter.data.float()
    return lm


@torch.no_grad()
def merge_adapters(lm: PreTrainedModel) -> PreTrainedModel:
    """Fold the adapters into the LM's weights (W + B A alpha/r, in the base weight's dtype) and put the plain
    modules back, in place: the LM then has the names and modules it had before add_adapters."""
    adapted = [(name, module) for name, module in lm.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent_name), child, module.get_base_layer())
    return lm
