"""The captioner's configuration: one dataclass, saved as JSON beside every checkpoint and inside it."""

from dataclasses import asdict, dataclass, fields
from typing import Any, get_type_hints

from data.errors import InputError

LM_DTYPES = ("fp32", "bf16", "fp16")  # the LM's weight dtypes (--lm_dtype); the mapper is always fp32
LORA_KEYS = {"r", "alpha", "dropout", "targets"}


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a captioner and the image encoder it was trained on."""

    feature_dim: int  # width of the image features, read from the feature file
    prefix_length: int = 10  # P: LM embeddings the mapper produces (xattn: 1, the learned start embedding)
    prefix_length_clip: int = 10  # transformer mapper: tokens the image feature is split into
    mapping_type: str = "mlp"  # a key of models.mappers.MAPPERS; "xattn": cross-attention over patch tokens
    num_layers: int = 8  # transformer mapper depth
    normalize_prefix: bool = False  # L2-normalize image features before the mapper
    lm_name: str = "gpt2"  # transformers id or directory of the LM and its tokenizer
    lm_config: dict | None = None  # the LM's config.to_dict(): rebuilds a fine-tuned LM offline
    lm_in_checkpoint: bool = True  # False with --only_prefix or LoRA: the LM comes from lm_name
    lm_dtype: str = "fp32"  # a LM_DTYPES name: the dtype of the LM's weights
    lora: dict | None = None  # LoRA adapters on the LM: {"r", "alpha", "dropout", "targets"} (models/lora.py)
    prompt: str | None = None  # encoder-decoder LMs: text the encoder reads after the prefix ("a picture of")
    encoder: dict | None = None  # models.encoders.EncoderSpec as a dict (from the feature file's meta)

    @property
    def cross_attention(self) -> bool:
        """Whether the LM cross-attends to patch tokens (xattn) rather than continuing a prefix."""
        return self.mapping_type == "xattn"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "CaptionerConfig":
        """Build from a dict, naming `source` if keys are missing, unknown or of the wrong type (a config
        comes from a file, which may be anyone's)."""
        if not isinstance(values, dict):
            raise InputError(f"{source}: the captioner config is {type(values).__name__} {values!r:.60}, not a dict")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(values) - known))  # str: keys from a checkpoint need not be strings
        if unknown:
            raise InputError(f"{source}: unknown captioner config key(s): {', '.join(unknown)}")
        if "feature_dim" not in values:
            raise InputError(f"{source}: captioner config lacks 'feature_dim'")
        types = get_type_hints(cls)
        for name, value in values.items():
            # bool is an int to isinstance: "true" or 1 must not pass for a flag, nor True for a size.
            wrong_kind = isinstance(value, bool) != (types[name] is bool)
            if wrong_kind or not isinstance(value, types[name]) or (types[name] is int and value < 1):
                kind = getattr(types[name], "__name__", str(types[name]))  # "int", or "dict | None"
                raise InputError(f"{source}: captioner config {name!r} is {value!r}, not a valid {kind}")
        if values.get("lm_dtype", "fp32") not in LM_DTYPES:
            raise InputError(f"{source}: captioner config 'lm_dtype' is {values['lm_dtype']!r}, not one of {LM_DTYPES}")
        if values.get("lora") is not None:
            check_lora(values["lora"], values.get("lm_in_checkpoint", True), source)
        return cls(**values)


def check_lora(spec: dict, lm_in_checkpoint: bool, source: str) -> None:
    """A LoRA spec as train.py writes it: a rank, a scale, a dropout rate and module names; the LM's own
    weights are not in the checkpoint (they are frozen, and come from lm_name)."""
    number = (int, float)
    fits = (
        set(spec) == LORA_KEYS
        and type(spec["r"]) is int
        and spec["r"] >= 1
        and isinstance(spec["alpha"], number)
        and not isinstance(spec["alpha"], bool)
        and spec["alpha"] > 0
        and isinstance(spec["dropout"], number)
        and not isinstance(spec["dropout"], bool)
        and 0 <= spec["dropout"] < 1
        and isinstance(spec["targets"], list)
        and len(spec["targets"]) > 0
        and all(isinstance(target, str) and target for target in spec["targets"])
    )
    if not fits:
        raise InputError(f"{source}: captioner config 'lora' is {spec!r:.200}, not a valid LoRA spec")
    if lm_in_checkpoint:
        raise InputError(f"{source}: captioner config has LoRA adapters but says the whole LM is in the checkpoint")
