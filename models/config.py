"""The captioner's configuration: one dataclass, saved as JSON beside every checkpoint and inside it."""

from dataclasses import asdict, dataclass, fields
from typing import Any, get_type_hints

from data.errors import InputError


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
    lm_in_checkpoint: bool = True  # False with --only_prefix: the LM comes from lm_name
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
        return cls(**values)
