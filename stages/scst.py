"""Stage 2b behind `train.py --scst`: self-critical sequence training (Rennie et al. 2017) from a train.py
checkpoint. Each step samples captions per image with the batched, KV-cached sampler, scores them
(CIDEr-D, CLIP-S, or both), subtracts a baseline (the other samples' mean, or the greedy caption's
reward) and raises the log-probability of the captions that beat it. `Scst` is the objective that says
so; the run itself (checkpoints, resume, torchrun, evaluation) is the Trainer's (stages/train.py)."""

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, get_constant_schedule_with_warmup

from data.errors import InputError
from data.features import FeatureFile, check_same_encoder
from data.references import ImageId
from models.captioner import ClipCaptionModel
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, Hypothesis, caption_text, decode
from models.device import autocast
from models.hf_export import load_captioner
from models.lm import context_length
from stages.distributed import DistributedContext
from stages.rewards import REWARD_TERMS, REWARDS, RewardInputs, RewardTerm, mean_of_others, policy_gradient_loss
from stages.train_options import TrainingOptions


class ImageRows(Dataset):
    """One item per image of a feature file: (its feature row (D,), its index in `image_ids`)."""

    def __init__(self, features: FeatureFile):
        rows = features.image_rows()
        self.image_ids: list[ImageId] = list(rows)
        self.rows = torch.tensor(list(rows.values()), dtype=torch.int64)
        self.embeddings = features.embeddings  # (N, D), shared, never modified

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.embeddings[self.rows[index]], index


@dataclass
class ImageBatch:
    """A batch of images: their features and their indices in ImageRows.image_ids."""

    features: torch.Tensor  # (B, D)
    indices: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return self.indices.shape[0]

    def to(self, device: torch.device) -> "ImageBatch":
        return ImageBatch(self.features.to(device, non_blocking=True), self.indices)


def collate_images(items: list[tuple[torch.Tensor, int]]) -> ImageBatch:
    """collate_fn of ImageRows."""
    return ImageBatch(torch.stack([feature for feature, _ in items]), torch.tensor([index for _, index in items]))


class RewardScorer:
    """The reward of a caption for its image: the weighted sum of the terms that --reward adds up
    (stages/rewards.py's REWARDS): CIDEr-D against the image's references in --data, CLIP-S, or
    CIDEr-D + clip_weight * CLIP-S."""

    def __init__(
        self,
        reward: str,
        train_file: FeatureFile,
        data_name: str,
        *,
        clip_model: str | None = None,
        clip_features: str | None = None,
        clip_weight: float = 1.0,
        device: torch.device | str = "cpu",
    ):
        inputs = RewardInputs(reward, train_file, data_name, clip_model, clip_features, clip_weight, device)
        self.terms: list[tuple[float, RewardTerm]] = [
            (getattr(inputs, weight) if isinstance(weight, str) else weight, REWARD_TERMS[name](inputs))
            for name, weight in REWARDS[reward].items()
        ]

    def __call__(self, image_ids: list[ImageId], captions: list[str]) -> torch.Tensor:
        """One reward per caption, float32 on the CPU. (N,)"""
        rewards = torch.zeros(len(captions))
        for weight, term in self.terms:
            rewards += weight * term(image_ids, captions)
        return rewards


def sampled_batch(hypotheses: list[list], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and their mask (N, T) of every sampled caption, image-major (EOS included)."""
    flat = [hypothesis.tokens for group in hypotheses for hypothesis in group]
    longest = max(len(tokens) for tokens in flat)
    tokens = torch.full((len(flat), longest), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(flat), longest), dtype=torch.int64)
    for row, caption in enumerate(flat):
        tokens[row, : len(caption)] = torch.tensor(caption)
        mask[row, : len(caption)] = 1
    return tokens, mask


def token_log_probs(
    network: torch.nn.Module, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log p(token) of every caption token under the model, with gradients, in one teacher-forced pass. (N, T)"""
    logits = network(features, tokens, mask, compute_loss=False).logits  # (N, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")
    return -nll.view(tokens.shape)


@dataclass
class Samples:
    """What the policy drew for a batch of images: K sampled captions each, and each image's greedy caption."""

    hypotheses: list[list[Hypothesis]]  # B lists of K, with their tokens
    captions: list[str]  # B * K, image-major
    greedy: list[str] | None  # B, when asked for


def sample_captions(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerBase,
    features: torch.Tensor,
    *,
    num_samples: int,
    max_length: int,
    greedy: bool,
    precision: str,
) -> Samples:
    """K sampled captions per image (B, D) and, with `greedy`, the greedy caption of each, without gradients.
    Samples come from torch's global RNG (saved for --resume)."""
    sample = DecodingOptions(method="sample", num_captions=num_samples, max_length=max_length)
    with torch.no_grad(), autocast(features.device, precision):
        conditioning = model.condition(features)
        hypotheses = decode(model, conditioning, tokenizer.eos_token_id, sample)  # B lists of K
        greedy_hypotheses = None
        if greedy:
            greedy_options = DecodingOptions(method="greedy", max_length=max_length)
            greedy_hypotheses = decode(model, conditioning, tokenizer.eos_token_id, greedy_options)
    captions = [caption_text(tokenizer, hypothesis.tokens) for group in hypotheses for hypothesis in group]
    greedy_captions = None
    if greedy_hypotheses is not None:
        greedy_captions = [caption_text(tokenizer, group[0].tokens) for group in greedy_hypotheses]
    return Samples(hypotheses, captions, greedy_captions)


def sampled_loss(
    network: torch.nn.Module,
    features: torch.Tensor,
    samples: Samples,
    rewards: torch.Tensor,
    baselines: torch.Tensor,
    *,
    pad_token_id: int,
    precision: str,
    world_size: int = 1,
    sums: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy-gradient loss of the samples of a batch of images (B, D), given their rewards and baselines
    (B, K, on the CPU), and the mean reward, baseline and sample length over the samples of every rank, with
    `sums` (figures summed over this rank's samples) as means per sample of every rank too. A collective when
    world_size > 1: every rank calls it once a step."""
    device = features.device
    num_samples = rewards.shape[1]
    tokens, mask = sampled_batch(samples.hypotheses, pad_token_id)
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast(device, precision):
        log_probs = token_log_probs(network, features.repeat_interleave(num_samples, dim=0), tokens, mask)
    advantages = (rewards - baselines).flatten().to(device)
    sums = sums or {}
    # Sums over every rank's samples (built from numbers: the mask is on the device, the rewards on the CPU).
    counts = [mask.sum().item(), rewards.sum().item(), baselines.sum().item(), mask.shape[0], *sums.values()]
    totals = torch.tensor(counts, dtype=torch.float64, device=device)  # (tokens, reward, baseline, samples, sums...)
    if world_size > 1:
        dist.all_reduce(totals)
    # DDP averages the ranks' gradients: dividing by the mean token count per rank makes that average the
    # gradient of all tokens over their number, the step one process takes at world_size times --bs.
    loss = policy_gradient_loss(log_probs, mask, advantages, num_tokens=totals[0].float() / world_size)
    tokens, reward_sum, baseline_sum, samples_count, *summed = totals.tolist()
    stats = {
        "reward": reward_sum / samples_count,
        "baseline": baseline_sum / samples_count,
        "sample_length": tokens / samples_count,
    }
    return loss, {**stats, **{name: value / samples_count for name, value in zip(sums, summed, strict=True)}}


def scst_loss(
    model: ClipCaptionModel,
    network: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    features: torch.Tensor,
    image_ids: list[ImageId],
    scorer: RewardScorer,
    *,
    num_samples: int,
    max_length: int,
    baseline: str,
    precision: str,
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One SCST loss for a batch of images (B, D) on the model's device, and its statistics over the
    samples of every rank (a collective when world_size > 1: every rank calls it once a step).

    Sampling and the teacher-forced pass both run without dropout, so the log-probabilities are those
    of the policy that drew the samples."""
    samples = sample_captions(
        model, tokenizer, features, num_samples=num_samples, max_length=max_length,
        greedy=baseline == "greedy", precision=precision,
    )  # fmt: skip
    sample_ids = [image_id for image_id in image_ids for _ in range(num_samples)]
    rewards = scorer(sample_ids, samples.captions).view(len(image_ids), num_samples)  # (B, K)
    if samples.greedy is None:
        baselines = mean_of_others(rewards)
    else:
        baselines = scorer(image_ids, samples.greedy).unsqueeze(1).expand_as(rewards)
    return sampled_loss(
        network, features, samples, rewards, baselines,
        pad_token_id=tokenizer.pad_token_id, precision=precision, world_size=world_size,
    )  # fmt: skip


class StartingCaptioner:
    """The --init_from captioner a sampling objective (SCST, unpaired training) fine-tunes: loaded once to read
    its config, checked against --data and --max_length, then handed to the Trainer as its model."""

    def __init__(self, options: TrainingOptions, objective_flag: str):
        self.options, self.objective_flag = options, objective_flag
        self.source = f"the --init_from checkpoint {options.init_from}"  # its config, not --data, decides the features
        self.model: ClipCaptionModel | None = None

    def load(self, train_file: FeatureFile) -> CaptionerConfig:
        """Load the captioner and check it against --data; its config."""
        options, flag = self.options, self.objective_flag
        if not options.init_from:
            raise InputError(f"{flag} needs --init_from, a checkpoint written by train.py (or its export directory)")
        model = load_captioner(options.init_from)
        config = model.config
        if config.lm_in_checkpoint and config.lm_dtype != "fp32":
            raise InputError(
                f"--init_from {options.init_from}: its whole LM is {config.lm_dtype}, where {flag}'s updates "
                "would round away; start from the LoRA or --only_prefix checkpoint it was exported from"
            )
        positions, lead = context_length(model.gpt), model.positions_before_caption
        if positions is not None and lead + options.max_length > positions:
            raise InputError(
                f"--max_length {options.max_length}: prefix ({lead}) plus caption exceeds the LM's {positions} positions"
            )
        if config.feature_dim != train_file.feature_dim:
            raise InputError(
                f"--data {options.data} has {train_file.feature_dim}-d features, the --init_from "
                f"checkpoint's mapper expects {config.feature_dim}-d"
            )
        # Same width is not enough: features of another encoder would train silently under its name.
        check_same_encoder(train_file, f"--data {options.data}", config.encoder, self.source)
        self.model = model
        return config

    def take(self) -> ClipCaptionModel:
        """The loaded captioner, in train mode (a frozen LM stays frozen); this holds it no longer."""
        model, self.model = self.model, None
        return model.train()


@contextmanager
def policy_mode(network: torch.nn.Module) -> Iterator[None]:
    """The network without dropout, then as it was: the log-probabilities are those of the sampling policy."""
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)


class Scst:
    """SCST's objective: the model from --init_from, images for data (--bs of them a batch), a constant
    learning rate after --warmup_steps, and the policy-gradient loss of sampled captions."""

    # The CLIP model and its image embeddings decide a clip reward as much as its weight does.
    identity = (
        "scst", "init_from", "reward", "baseline", "scst_samples", "clip_weight", "max_length", "clip_model", "clip_features",
    )  # fmt: skip
    default_warmup_steps = 0  # a constant rate from the first step
    default_reward = "cider"

    def __init__(self, options: TrainingOptions, context: DistributedContext, device: torch.device, precision: str):
        self.options, self.context, self.device, self.precision = options, context, device, precision
        self.start = StartingCaptioner(options, "--scst")

    def model_config(self, train_file: FeatureFile) -> CaptionerConfig:
        """The --init_from checkpoint's config, checked against --data."""
        if self.options.baseline == "mean" and self.options.scst_samples < 2:
            raise InputError("--baseline mean needs --scst_samples of at least 2 (or use --baseline greedy)")
        if self.options.reward not in REWARDS:
            raise InputError(f"--reward {self.options.reward}: --scst takes {', '.join(REWARDS)}")
        return self.start.load(train_file)

    def model_source(self) -> str:
        return self.start.source

    def build_model(self, config: CaptionerConfig) -> ClipCaptionModel:
        return self.start.take()

    def training_data(
        self, train_file: FeatureFile, tokenizer: PreTrainedTokenizerBase, model: ClipCaptionModel
    ) -> tuple[Dataset, Callable]:
        """One item per image; the reward scorer reads the images' references (and CLIP embeddings)."""
        self.model, self.tokenizer = model, tokenizer
        self.images = ImageRows(train_file)
        self.scorer = RewardScorer(
            self.options.reward,
            train_file,
            self.options.data,
            clip_model=self.options.clip_model,
            clip_features=self.options.clip_features,
            clip_weight=self.options.clip_weight,
            device=self.device,
        )
        return self.images, collate_images

    def data_key(self, train_file: FeatureFile, train_set: Dataset) -> str:
        """The images' captions and features: what --resume checks it trains on."""
        captions = json.dumps([[c["image_id"], c["caption"]] for c in train_file.captions], default=str)
        return f"scst-{hashlib.sha256(captions.encode()).hexdigest()[:16]}-{train_file.embeddings_digest()}"

    def schedule(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """A constant learning rate after the warmup."""
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)

    def loss(self, network: torch.nn.Module, batch: ImageBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """SCST's loss on a batch of images, with the mean reward, baseline and sample length of all ranks."""
        image_ids = [self.images.image_ids[index] for index in batch.indices.tolist()]
        with policy_mode(network):
            return scst_loss(
                self.model,
                network,
                self.tokenizer,
                batch.features,
                image_ids,
                self.scorer,
                num_samples=self.options.scst_samples,
                max_length=self.options.max_length,
                baseline=self.options.baseline,
                precision=self.precision,
                world_size=self.context.world_size,
            )

    def state_dict(self) -> dict:
        """Nothing besides the model: the Trainer saves all of it."""
        return {}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Nothing to put back."""
