"""Unpaired adversarial training behind `train.py --unpaired` (CgT-GAN, Yu et al. 2023): images and a sentence
corpus that are never paired. Per image, SCST's sampler draws captions and a greedy baseline; the reward is
a CLIP score (against the image, or its CLIP-agg over the corpus), a text discriminator's logit, or
lambda_t * CLIP + (1 - lambda_t) * discriminator. The discriminator (models/discriminator.py) then takes one
BCE step on corpus sentences (real) against the sampled captions (fake): generator and discriminator in turn.
Its weights, optimizer and the step count are the objective's state, saved in `_latest.pt` for --resume.
No caption of --data is ever read: its images are the only thing the run takes from it."""

import hashlib
import json
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, get_constant_schedule_with_warmup

from data.errors import InputError, first_line
from data.features import FeatureFile
from data.store import read_features
from models.captioner import ClipCaptionModel
from models.config import CaptionerConfig
from models.device import autocast
from models.discriminator import TextDiscriminator, load_discriminator
from stages.distributed import DistributedContext
from stages.rewards import REWARD_TERMS, UNPAIRED_REWARDS, RewardInputs, RewardTerm
from stages.scst import (
    ImageBatch,
    ImageRows,
    StartingCaptioner,
    collate_images,
    policy_mode,
    sample_captions,
    sampled_loss,
)
from stages.train_options import TrainingOptions


def read_corpus(path: str | None) -> FeatureFile:
    """The --corpus sentences and their text embeddings; a missing file or one of image features is one line."""
    if not path:
        raise InputError("--unpaired needs --corpus, a sentence corpus's features (parse_corpus.py)")
    corpus = read_features(path)
    modality = corpus.meta.get("modality")
    if modality != "text":
        raise InputError(
            f"--corpus {path} holds {modality or 'image'} features, not a sentence corpus's (modality text, as "
            "parse_corpus.py writes)"
        )
    return corpus


def clip_share(step: int, reward_weight: float, gan_steps: int, gan_warm_steps: int) -> float:
    """lambda_t, the CLIP reward's weight at step t (from 0): 0 for the first gan_steps, then rising linearly
    over gan_warm_steps to reward_weight, and there after."""
    if step < gan_steps:
        return 0.0
    if gan_warm_steps == 0:
        return reward_weight
    return reward_weight * min(1.0, (step - gan_steps) / gan_warm_steps)


def adversarial_rewards(sample_logits: torch.Tensor, greedy_logits: torch.Tensor) -> torch.Tensor:
    """The adversarial reward of each sample: D's logit on it minus D's logit on its image's greedy caption.
    (B, K), (B,) -> (B, K)"""
    return sample_logits - greedy_logits.unsqueeze(1)


def average_gradients(module: torch.nn.Module, world_size: int) -> None:
    """The mean over ranks of each gradient (what DDP does), so every rank's copy takes the same step."""
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)  # SUM: gloo has no AVG
            parameter.grad /= world_size


class Unpaired:
    """The unpaired objective: the model from --init_from, images of --data (--bs a batch, their captions never
    read), sentences of --corpus, a constant learning rate after --warmup_steps, and SCST's policy-gradient loss
    of sampled captions under the CLIP and adversarial rewards, with a greedy baseline."""

    identity = (
        "unpaired", "init_from", "reward", "scst_samples", "max_length", "clip_model", "clip_features", "corpus",
        "discriminator", "reward_weight", "gan_steps", "gan_warm_steps", "disc_lr",
    )  # fmt: skip
    default_warmup_steps = 0  # a constant rate from the first step
    default_reward = "clip_agg+adv"

    def __init__(self, options: TrainingOptions, context: DistributedContext, device: torch.device, precision: str):
        self.options, self.context, self.device, self.precision = options, context, device, precision
        self.start = StartingCaptioner(options, "--unpaired")
        self.step = 0  # this objective's steps: lambda_t's t
        self.clip_term: RewardTerm | None = None
        self.discriminator: TextDiscriminator | None = None

    def model_config(self, train_file: FeatureFile) -> CaptionerConfig:
        """The --init_from checkpoint's config, checked against --data; --reward and --corpus checked first."""
        if self.options.reward not in UNPAIRED_REWARDS:
            raise InputError(f"--reward {self.options.reward}: --unpaired takes {', '.join(UNPAIRED_REWARDS)}")
        if self.options.reward_weight > 1:
            raise InputError(f"--reward_weight {self.options.reward_weight}: must be at most 1")
        self.corpus = read_corpus(self.options.corpus)
        return self.start.load(train_file)

    def model_source(self) -> str:
        return self.start.source

    def build_model(self, config: CaptionerConfig) -> ClipCaptionModel:
        return self.start.take()

    def training_data(
        self, train_file: FeatureFile, tokenizer: PreTrainedTokenizerBase, model: ClipCaptionModel
    ) -> tuple[Dataset, Callable]:
        """One item per image; the CLIP reward reads the images' CLIP embeddings (and the corpus's), the
        discriminator (its head drawn from the seeded RNG, the same on every rank) the corpus's sentences."""
        self.model, self.tokenizer = model, tokenizer
        self.images = ImageRows(train_file)
        clip_name, adversarial = UNPAIRED_REWARDS[self.options.reward]
        if clip_name is not None:
            inputs = RewardInputs(
                self.options.reward,
                train_file,
                self.options.data,
                clip_model=self.options.clip_model,
                clip_features=self.options.clip_features,
                device=self.device,
                corpus=self.corpus,
            )
            self.clip_term = REWARD_TERMS[clip_name](inputs)
        if adversarial:
            self.discriminator = load_discriminator(self.options.discriminator).to(self.device)
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=self.options.disc_lr)
            self.disc_scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        return self.images, collate_images

    def data_key(self, train_file: FeatureFile, train_set: ImageRows) -> str:
        """The images (ids and features) and the corpus (its sentence count and embeddings): what --resume checks."""
        image_ids = json.dumps(train_set.image_ids, default=str)
        corpus = f"{len(self.corpus.captions)}-{self.corpus.embeddings_digest()}"
        return f"unpaired-{hashlib.sha256(image_ids.encode()).hexdigest()[:16]}-{train_file.embeddings_digest()}-{corpus}"

    def schedule(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """A constant learning rate after the warmup."""
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)

    def clip_weight(self) -> float:
        """lambda_t of this step: the schedule's under clip_agg+adv, 1 for a CLIP reward alone, 0 for adv alone."""
        if self.discriminator is None:
            return 1.0
        if self.clip_term is None:
            return 0.0
        options = self.options
        return clip_share(self.step, options.reward_weight, options.gan_steps, options.gan_warm_steps)

    @torch.no_grad()
    def discriminator_logits(self, texts: list[str]) -> torch.Tensor:
        """D's logit on each text, without dropout or gradients, float32 on the CPU. (N,)"""
        self.discriminator.eval()
        with autocast(self.device, self.precision):
            return self.discriminator(**self.discriminator.tokenize(texts, self.device)).float().cpu()

    def train_discriminator(self, fakes: list[str]) -> tuple[float, float]:
        """One BCE step of D on as many corpus sentences (drawn from torch's global RNG: saved for --resume) as
        sampled captions; returns (its loss, the sum over the (real, fake) pairs of their mean accuracy)."""
        count = len(fakes)
        rows = torch.randint(len(self.corpus.captions), (count,)).tolist()
        reals = [self.corpus.captions[row]["caption"] for row in rows]
        self.discriminator.train()
        with autocast(self.device, self.precision):
            logits = self.discriminator(**self.discriminator.tokenize(reals + fakes, self.device)).float()  # (2N,)
        labels = torch.cat([torch.ones(count), torch.zeros(count)]).to(self.device)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.disc_scaler.scale(loss).backward()
        if self.context.world_size > 1:
            average_gradients(self.discriminator, self.context.world_size)
        self.disc_scaler.step(self.disc_optimizer)
        self.disc_scaler.update()
        self.disc_optimizer.zero_grad(set_to_none=True)
        correct = ((logits.detach() > 0) == labels.bool()).float().cpu()
        return loss.item(), ((correct[:count] + correct[count:]) / 2).sum().item()

    def loss(self, network: torch.nn.Module, batch: ImageBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy-gradient loss of the batch's samples (after D's step on them), with the mean reward,
        baseline, sample length, CLIP and adversarial rewards and D's accuracy and loss of all ranks, and lambda_t."""
        image_ids = [self.images.image_ids[index] for index in batch.indices.tolist()]
        num_images, num_samples = len(image_ids), self.options.scst_samples
        weight = self.clip_weight()
        with policy_mode(network):
            samples = sample_captions(
                self.model, self.tokenizer, batch.features, num_samples=num_samples,
                max_length=self.options.max_length, greedy=True, precision=self.precision,
            )  # fmt: skip
            texts = samples.captions + samples.greedy  # B * K samples, then the B greedy captions
            flat = num_images * num_samples
            rewards = torch.zeros(len(texts))  # each text's reward; the greedy captions' are the baselines
            sums: dict[str, float] = {}  # sums over this rank's samples, reduced by sampled_loss
            if self.clip_term is not None:
                sample_ids = [image_id for image_id in image_ids for _ in range(num_samples)]
                clip = self.clip_term(sample_ids + image_ids, texts)
                sums["clip_reward"] = clip[:flat].sum().item()
                rewards += weight * clip
            if self.discriminator is not None:
                logits = self.discriminator_logits(texts)
                adversarial = adversarial_rewards(logits[:flat].view(num_images, num_samples), logits[flat:])
                sums["adv_reward"] = adversarial.sum().item()
                rewards += (1 - weight) * logits
                disc_loss, correct = self.train_discriminator(samples.captions)  # D's turn, after it judged
                sums |= {"disc_accuracy": correct, "disc_loss": disc_loss * flat}
            baselines = rewards[flat:].unsqueeze(1).expand(num_images, num_samples)
            loss, stats = sampled_loss(
                network, batch.features, samples, rewards[:flat].view(num_images, num_samples), baselines,
                pad_token_id=self.tokenizer.pad_token_id, precision=self.precision,
                world_size=self.context.world_size, sums=sums,
            )  # fmt: skip
        self.step += 1
        return loss, {**stats, "lambda": weight}

    def state_dict(self) -> dict:
        """The step count, and the discriminator's weights, AdamW state and loss scale."""
        state: dict = {"step": self.step}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
            state["disc_scaler"] = self.disc_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict, source: str) -> None:
        """Put back a state_dict() of the saved run; one that lacks it, or does not fit, is one line."""
        expected = ["step", *(["discriminator", "disc_optimizer", "disc_scaler"] if self.discriminator else [])]
        missing = [key for key in expected if key not in state]
        if missing:
            raise InputError(f"--resume {source}: not an --unpaired run's checkpoint (lacks {', '.join(missing)})")
        try:
            if self.discriminator is not None:
                self.discriminator.load_state_dict(state["discriminator"])
                self.disc_optimizer.load_state_dict(state["disc_optimizer"])
                self.disc_scaler.load_state_dict(state["disc_scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise InputError(f"--resume {source}: the discriminator's state does not fit ({first_line(error)})") from None
        if type(state["step"]) is not int or state["step"] < 0:
            raise InputError(f"--resume {source}: the saved position is damaged (step {state['step']!r:.60})")
        self.step = state["step"]
