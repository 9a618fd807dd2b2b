"""The cross-entropy objective (ClipCap's): a fresh mapper on the LM of the flags, teacher-forced on every
caption of the training file, under ClipCap's schedule (linear warmup, then linear decay to 0)."""

from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from data.captions import CaptionBatch, CaptionCollator, CaptionDataset, build_caption_dataset
from data.errors import InputError
from data.features import FeatureFile
from models.captioner import ClipCaptionModel
from models.checkpoint import build_captioner
from models.config import CaptionerConfig
from models.device import autocast
from models.lm import context_length
from stages.distributed import DistributedContext
from stages.train_options import TrainingOptions, captioner_config


def compute_loss(network: torch.nn.Module, batch: CaptionBatch, device: torch.device, precision: str) -> torch.Tensor:
    """The teacher-forced loss of a batch (already on `device`), under the run's precision."""
    with autocast(device, precision):
        return network(batch.features, batch.tokens, batch.attention_mask).loss


def caption_dataset(
    features: FeatureFile,
    tokenizer: PreTrainedTokenizerBase,
    model: ClipCaptionModel,
    cache_dir: str | None,
    context: DistributedContext,
) -> CaptionDataset:
    """A feature file's captions, tokenized through the cache and cut to what the LM's positions leave after
    the prefix (an encoder-decoder's decoder start; training and validation alike)."""
    prefix_length = model.positions_before_caption
    positions = context_length(model.gpt)
    if positions is not None and positions <= prefix_length:
        raise InputError(f"--prefix_length {prefix_length} leaves no room in the LM's {positions} positions")
    max_tokens = positions - prefix_length if positions is not None else None
    return build_caption_dataset(features, tokenizer, max_tokens, cache_dir, context.is_main, context.is_main)


class CrossEntropy:
    """Train on captions: each item is one caption, its loss the LM's cross-entropy over the caption tokens."""

    identity = ()  # nothing beyond the Trainer's options decides its weights
    default_warmup_steps = 5000  # ClipCap's
    default_reward = None  # it takes no reward

    def __init__(self, options: TrainingOptions, context: DistributedContext, device: torch.device, precision: str):
        self.options, self.context, self.device, self.precision = options, context, device, precision

    def model_config(self, train_file: FeatureFile) -> CaptionerConfig:
        """The architecture from the flags, the feature width and encoder from the feature file."""
        return captioner_config(self.options, train_file)

    def model_source(self) -> str:
        """The training file: its features decide the model's."""
        return f"--data {self.options.data}"

    def build_model(self, config: CaptionerConfig) -> ClipCaptionModel:
        """A fresh mapper on the LM of the config (frozen with --only_prefix and LoRA)."""
        model = build_captioner(config)
        if not config.lm_in_checkpoint:
            model.freeze_lm()
        return model

    def training_data(
        self, train_file: FeatureFile, tokenizer: PreTrainedTokenizerBase, model: ClipCaptionModel
    ) -> tuple[Dataset, Callable]:
        """One item per caption, padded per batch."""
        dataset = caption_dataset(train_file, tokenizer, model, self.options.cache_dir, self.context)
        return dataset, CaptionCollator(tokenizer.pad_token_id)

    def data_key(self, train_file: FeatureFile, train_set: CaptionDataset) -> str:
        """What `--resume` checks it trains on: the tokenized captions and the feature values."""
        return f"{train_set.tokenized.key}-{train_file.embeddings_digest()}"

    def schedule(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """ClipCap's: linear warmup, then linear decay to 0 at the last step."""
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    def loss(self, network: torch.nn.Module, batch: CaptionBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's teacher-forced loss; no figures beside it."""
        return compute_loss(network, batch, self.device, self.precision), {}

    def state_dict(self) -> dict:
        """Nothing besides the model: the Trainer saves all of it."""
        return {}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Nothing to put back."""
