"""The cross-entropy objective (ClipCap's): a fresh mapper on the LM of the flags, teacher-forced on every
caption of the training file, under ClipCap's schedule (linear warmup, then linear decay to 0)."""

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
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


def capdec_noise(features: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """CapDec's noise: normalize(normalize(x) + e), e ~ N(0, std^2) per dimension, drawn on the CPU from
    `generator` (so a step's draw is the same on every device). (B, D) -> (B, D)."""
    noise = torch.randn(features.shape, generator=generator) * std
    return F.normalize(F.normalize(features.float(), dim=-1) + noise.to(features.device), dim=-1)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator of its own for one step of one rank: a resumed run draws what the uninterrupted run drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


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

    identity = ("noise_std",)  # beyond the Trainer's options
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
        # Kept: its count of steps taken (restored on --resume) numbers the noise's draws.
        self.scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        return self.scheduler

    def loss(self, network: torch.nn.Module, batch: CaptionBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's teacher-forced loss, on features noised with --noise_std; no figures beside it."""
        if self.options.noise_std:  # here, not in the dataset or the validation loss: training features only
            generator = step_generator(self.options.seed, self.context.rank, self.scheduler.last_epoch)
            batch = replace(batch, features=capdec_noise(batch.features, self.options.noise_std, generator))
        return compute_loss(network, batch, self.device, self.precision), {}

    def state_dict(self) -> dict:
        """Nothing besides the model: the Trainer saves all of it."""
        return {}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Nothing to put back."""
