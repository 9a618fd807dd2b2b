"""What a training run optimizes: the objectives the Trainer (stages/train.py) runs, by name. An objective
is a value the Trainer holds, not a subclass of it; a new one is a module with a class of this shape and
one line in OBJECTIVES."""

from collections.abc import Callable
from typing import Protocol

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from data.features import FeatureFile
from models.captioner import ClipCaptionModel
from models.config import CaptionerConfig
from stages.cross_entropy import CrossEntropy
from stages.distributed import DistributedContext
from stages.scst import Scst
from stages.train_options import TrainingOptions
from stages.unpaired import Unpaired


class Objective(Protocol):
    """What one training step means. The Trainer calls these in this order: model_config (before anything
    slow, so --resume checks it first), build_model, training_data, data_key, schedule, then loss every step."""

    identity: tuple[str, ...]  # its options that decide the weights besides the Trainer's (kept on --resume)
    default_warmup_steps: int  # --warmup_steps when not given
    default_reward: str | None  # --reward when not given (None: it takes no reward)

    def __init__(
        self, options: TrainingOptions, context: DistributedContext, device: torch.device, precision: str
    ) -> None: ...

    def model_config(self, train_file: FeatureFile) -> CaptionerConfig:
        """The model's config, checked against the training file."""

    def model_source(self) -> str:
        """Where the model config's feature width and encoder come from, as errors name it."""

    def build_model(self, config: CaptionerConfig) -> ClipCaptionModel:
        """The model to train (CPU; the Trainer moves it)."""

    def training_data(
        self, train_file: FeatureFile, tokenizer: PreTrainedTokenizerBase, model: ClipCaptionModel
    ) -> tuple[Dataset, Callable]:
        """The training items and their collate_fn (a batch has `.to(device)` and `len`)."""

    def data_key(self, train_file: FeatureFile, train_set: Dataset) -> str:
        """What --resume checks the run trains on."""

    def schedule(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule."""

    def loss(self, network: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimize on a batch (on the device; `network` is DDP-wrapped under torchrun) and
        figures to log beside it (rank 0's are written: figures of all ranks are the objective's to reduce)."""

    def state_dict(self) -> dict:
        """What the objective trains or counts besides the model (a discriminator and its optimizer): saved in
        `_latest.pt` for --resume (tensors, numbers, strings, lists and dicts of them)."""

    def load_state_dict(self, state: dict, source: str) -> None:
        """Put back a state_dict() of the run in `source` (after training_data); a damaged one is one line."""


OBJECTIVES: dict[str, type[Objective]] = {
    "cross_entropy": CrossEntropy,
    "scst": Scst,
    "unpaired": Unpaired,
}
