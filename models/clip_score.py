"""CLIP-S and RefCLIP-S (Hessel et al. 2021): how well a caption matches its image (and its references)
in a CLIP model's joint space. One scorer serves SCST's CLIP reward and evaluation."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoTokenizer, CLIPModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from data.errors import InputError, first_line
from data.features import FeatureFile
from models.aligned import aligned_text_space
from models.encoders import CLIP_MODELS

CLIP_S_WEIGHT = 2.5  # w in CLIP-S = w * max(cos, 0): stretches the scores over about [0, 1]
CAPTION_PROMPT = "A photo depicts "  # prepended to candidates, as in the paper


class ClipTextEncoder(nn.Module):
    """CLIP's text tower and text projection: tokenizer outputs -> projected embeddings (B, D), not normalized."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.text_model, self.text_projection = model.text_model, model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B, H): EOS
        return self.text_projection(pooled)  # (B, D)


class ClipScorer:
    """A whole CLIP model (both towers, frozen) and its tokenizer, by short name, transformers id or directory.
    `purpose` names what needs the text tower in the refusal of a model without one."""

    def __init__(self, name: str, device: torch.device | str = "cpu", batch_size: int = 256, purpose: str = "CLIP-S"):
        model_id = CLIP_MODELS.get(name, name)
        try:
            config = AutoConfig.from_pretrained(model_id)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot load CLIP model {name!r}: {first_line(error)}") from None
        if config.model_type != "clip":
            raise InputError(
                f"CLIP model {name!r} is a {config.model_type!r} model; {purpose} needs a whole CLIP model with a text tower"
            )
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model, info = CLIPModel.from_pretrained(model_id, output_loading_info=True)
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_id)
        except (OSError, ValueError, RuntimeError) as error:
            raise InputError(f"cannot load CLIP model {name!r}: {first_line(error)}") from None
        finally:
            transformers_logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            raise InputError(
                f"CLIP model {name!r} lacks {len(info['missing_keys'])} weight(s), e.g. {info['missing_keys'][0]}"
            )
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.batch_size = batch_size
        self.name = clip_name(model_id)
        self.max_tokens = self.model.config.text_config.max_position_embeddings  # 77 for OpenAI's models
        self.text_encoder = ClipTextEncoder(self.model)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask on the scorer's device, padded, truncated to the model's 77 tokens."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """The projected text embeddings (N, D), float32, not normalized (as CLIP's get_text_features), texts
        truncated to the model's 77 tokens."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            rows.append(self.text_encoder(**self.tokenize(texts[start : start + self.batch_size])).float())
        return torch.cat(rows) if rows else torch.zeros(0, self.model.config.projection_dim)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """L2-normalized text embeddings (N, D), float32, texts truncated to the model's 77 tokens."""
        return F.normalize(self.text_features(texts), dim=-1)

    def clip_s(self, image_embeds: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """CLIP-S of each caption with its image: 2.5 * max(cos(image, "A photo depicts " + caption), 0). (N,)"""
        return self.scores(image_embeds, captions)[0]

    def scores(
        self, image_embeds: torch.Tensor, captions: list[str], references: list[list[str]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CLIP-S, RefCLIP-S) of each caption, (N,) each; RefCLIP-S only with references. RefCLIP-S is the
        harmonic mean of CLIP-S and max(the best cosine between the prompted caption and a reference, 0)."""
        candidates = self.text_embeddings([CAPTION_PROMPT + caption for caption in captions])  # (N, D)
        images = F.normalize(image_embeds.float().to(self.device), dim=-1)
        clip_s = CLIP_S_WEIGHT * (images * candidates).sum(dim=-1).clamp(min=0)
        if references is None:
            return clip_s, None
        reference_embeds = self.text_embeddings([reference for group in references for reference in group])
        best, start = [], 0
        for row, group in enumerate(references):
            best.append((reference_embeds[start : start + len(group)] @ candidates[row]).max().clamp(min=0))
            start += len(group)
        reference_s = torch.stack(best)
        total = (clip_s + reference_s).clamp(min=1e-12)  # both 0: RefCLIP-S is 0
        return clip_s, 2 * clip_s * reference_s / total


def clip_name(model_id: str) -> str:
    """How feature files record a CLIP model: a directory by its absolute path (as models.encoders resolves it)."""
    return str(Path(model_id).resolve()) if Path(model_id).is_dir() else model_id


def holds_image_embeds_of(features: FeatureFile, name: str) -> bool:
    """Whether a feature file holds image embeddings in the space of the CLIP model `name` (resolved as ClipScorer
    does): its image_embeds, or a train_clip.py encoder's, aligned to its frozen text tower."""
    encoder = features.meta.get("encoder")
    if not isinstance(encoder, dict):
        return False
    if encoder.get("family") == "aligned":
        return aligned_text_space(str(encoder.get("name"))) == name
    return encoder.get("name") == name and encoder.get("feature_type") == "image_embeds"
