"""Stage 2's loop: the Trainer runs a training run whatever it optimizes (device, precision, DDP or FSDP,
the schedule, clipping, checkpoints and exact resume, evaluation, W&B, the run's lock). What one step
means is the run's objective (stages/objectives.py: cross-entropy, SCST, unpaired), a value the Trainer holds, not a
subclass of it. One step, as `Trainer.train_step` runs it:

    loss, figures = objective.loss(network, batch)      # the objective's loss and the figures to log
    loss_value = mean of loss over ranks                 # a non-finite one stops the run before any update
    scaler.scale(loss).backward()                        # then clip to --max_grad_norm, and
    scaler.step(optimizer); scaler.update(); scheduler.step(); optimizer.zero_grad()
"""

import functools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from data.captions import CaptionCollator, drop_long_captions
from data.errors import InputError
from data.features import FeatureFile, check_same_encoder
from data.options import check_ranges, option_defaults
from data.store import read_features
from models.captioner import ClipCaptionModel
from models.checkpoint import load_state_into, save_checkpoint, save_config_json
from models.decoding import DecodingOptions
from models.device import resolve_precision
from models.lm import context_length, enable_gradient_checkpointing, is_encoder_decoder, lm_blocks, load_tokenizer
from stages.cross_entropy import caption_dataset, compute_loss
from stages.distributed import (
    DistributedContext,
    close_distributed,
    gather_counts,
    gathered_model_state,
    gathered_optimizer_state,
    init_distributed,
    load_sharded_optimizer_state,
    local_part,
    main_work_group,
    shard_model,
    wait_for_main,
)
from stages.export import check_training_export, export_trained
from stages.objectives import OBJECTIVES
from stages.tracking import make_tracker
from stages.train_options import TrainingOptions
from stages.train_state import (
    TRAJECTORY_OPTIONS,
    RunFiles,
    RunPosition,
    StepLog,
    check_counters,
    check_same_run,
    check_same_runtime,
    gather_rng_states,
    read_resume_checkpoint,
    restore_training_state,
    resume_path,
    runtime_record,
)

# ClipCap's AdamW epsilon (torch's default is 1e-8).
ADAM_EPS = 1e-6


def epoch_order(dataset: Dataset, seed: int, epoch: int, context: DistributedContext) -> list[int]:
    """This rank's share of the epoch's permutation: a pure function of seed and epoch that draws
    nothing from the global RNG, so a resumed run can skip batches and stay on the same path."""
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def apply_gradients(
    loss: torch.Tensor,
    trainable: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    max_grad_norm: float,
) -> None:
    """Backward, gradient clipping (0: none), optimizer and schedule step; the gradients are freed after."""
    scaler.scale(loss).backward()
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class Trainer:
    """One training run: its objective, the model, its optimizer and schedule, the data, and where the run stands."""

    def __init__(self, options: TrainingOptions, context: DistributedContext, device: torch.device):
        self.options, self.context, self.device = options, context, device
        self.precision = resolve_precision(options.precision, device)
        self._check_sharding()
        self.objective = OBJECTIVES[options.objective](options, context, device, self.precision)
        self.runtime = runtime_record(device, self.precision, options.fsdp)
        self.files = RunFiles(Path(options.out_dir), options.prefix)
        inputs = {"--data": options.data, "--val_data": options.val_data, "--init_from": options.init_from}
        self.files.check_apart_from(inputs, options.epochs)
        self.tracker = make_tracker(
            options.wandb, options.wandb_project, options.wandb_run_name, Path(options.out_dir), context.is_main
        )
        checkpoint, source = self._resume_checkpoint()
        self._check_evaluation_inputs()
        train_file = self._short_captions(read_features(options.data), f"--data {options.data}")
        self.config = self.objective.model_config(train_file)
        if checkpoint is not None:  # before anything slow: a wrong file or flag fails at once
            check_same_run(checkpoint, source, self.config, self.identity(), option_defaults(TrainingOptions))
            check_same_runtime(checkpoint, source, self.runtime)
        self.tokenizer = load_tokenizer(self.config.lm_name)
        torch.manual_seed(options.seed)  # the mapper's initial weights
        self.model = self.objective.build_model(self.config)
        if options.gradient_checkpointing:
            enable_gradient_checkpointing(self.model.gpt)  # each epoch's network.train() sets a frozen LM's blocks
        self.train_set, self.train_collate = self.objective.training_data(train_file, self.tokenizer, self.model)
        self.val_file = self._validation_file()
        self.val_set = self._val_set(self.val_file) if self.val_file is not None else None
        if checkpoint is not None:  # the whole weights, before they are sharded: every rank has read the file
            load_state_into(self.model, checkpoint["model"], str(source))
        self._place_model()
        self.trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=options.lr, weight_decay=options.weight_decay, eps=ADAM_EPS
        )
        samples_per_rank = math.ceil(len(self.train_set) / context.world_size)  # DistributedSampler pads to this
        self.steps_per_epoch = math.ceil(samples_per_rank / options.batch_size)
        total_steps = options.epochs * self.steps_per_epoch
        self.scheduler = self.objective.schedule(self.optimizer, options.warmup_steps, total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.position = RunPosition(data=self.objective.data_key(train_file, self.train_set))
        self.last_saved: Path | None = None
        if checkpoint is not None:
            self._restore(checkpoint, source)
        else:
            torch.manual_seed(options.seed + context.rank)  # dropout differs between ranks
        self.main_work = main_work_group(context)  # the other ranks wait there while rank 0 scores and saves
        device_ids = [device.index] if device.type == "cuda" else None
        replicated = context.enabled and not options.fsdp
        self.network = DistributedDataParallel(self.model, device_ids=device_ids) if replicated else self.model
        self._tidy_run_files(resumed=checkpoint is not None)

    def _check_sharding(self) -> None:
        """--fsdp needs ranks to shard over, and a precision without fp16's loss scaler (whose skipped steps
        would be decided by each rank's gradient shards alone)."""
        if not self.options.fsdp:
            return
        if not self.context.enabled:
            raise InputError(
                "--fsdp shards the model over torchrun's processes: launch 2 or more (torchrun --nproc_per_node N "
                "train.py ...), or train without --fsdp"
            )
        if self.precision == "fp16":
            raise InputError(
                "--fsdp does not train in fp16 (its loss scaler is per rank); use --precision bf16 or fp32"
            )

    def _place_model(self) -> None:
        """The model on the device: whole on every rank, or with --fsdp sharded over the ranks (the LM's
        blocks one by one, then the rest)."""
        if self.options.fsdp:
            if is_encoder_decoder(self.model.gpt):  # its encoder's and decoder's blocks: not yet tested sharded
                raise InputError("--fsdp shards causal LMs; an encoder-decoder LM (T5, BART) trains under plain torchrun")
            shard_model(self.model, lm_blocks(self.model.gpt), self.device)
        else:
            self.model.to(self.device)

    def identity(self) -> dict:
        """The options that decide the run's weights (the Trainer's and its objective's): --resume keeps them."""
        return {name: getattr(self.options, name) for name in (*TRAJECTORY_OPTIONS, *self.objective.identity)}

    def _resume_checkpoint(self) -> tuple[dict | None, Path | None]:
        """With --resume, the saved run and its file; without, (None, None) once no earlier run is in the way."""
        if not self.options.resume:
            self.files.check_free(self.options.overwrite)
            return None, None
        source = resume_path(self.options.resume, self.options.prefix)
        return read_resume_checkpoint(source), source

    def _check_evaluation_inputs(self) -> None:
        """--eval_every needs --val_data, and Java: said now, not after the first epoch's work."""
        if self.options.eval_every == 0:
            return
        if not self.options.val_data:
            raise InputError("--eval_every needs --val_data (the captions to score against)")
        # Imported here: pycocoevalcap (and Java) are needed only where captions are scored, so
        # training without --eval_every runs where they are missing (e.g. a bare GPU box).
        from stages.evaluate import require_java

        require_java()

    def _tidy_run_files(self, resumed: bool) -> None:
        """Temporaries a killed run left (--resume, --overwrite), and with --overwrite the earlier run's files:
        only now that the data, flags and model have all checked out."""
        if not self.context.is_main:
            return
        if resumed or self.options.overwrite:
            self.files.remove_temporaries()
        if not resumed and self.options.overwrite:
            self.files.remove_existing()

    def _short_captions(self, features: FeatureFile, name: str) -> FeatureFile:
        """The file without captions over --max_caption_chars, said once; refused if none is left."""
        limit = self.options.max_caption_chars
        features, dropped = drop_long_captions(features, limit)
        if not features.captions:
            raise InputError(f"{name}: every caption is longer than --max_caption_chars {limit}")
        if dropped and self.context.is_main:
            print(f"{name}: dropped {dropped} caption(s) longer than --max_caption_chars {limit}")
        return features

    def _validation_file(self) -> FeatureFile | None:
        if not self.options.val_data:
            return None
        return self._short_captions(read_features(self.options.val_data), f"--val_data {self.options.val_data}")

    def _val_set(self, val_file: FeatureFile) -> Dataset:
        """The validation captions, checked against the model: their loss is cross-entropy whatever the objective."""
        expected_by = self.objective.model_source()
        if val_file.feature_dim != self.config.feature_dim:
            raise InputError(
                f"--val_data {self.options.val_data} has {val_file.feature_dim}-d features, "
                f"but {expected_by} expects {self.config.feature_dim}-d"
            )
        check_same_encoder(val_file, f"--val_data {self.options.val_data}", self.config.encoder, expected_by)
        return caption_dataset(val_file, self.tokenizer, self.model, self.options.cache_dir, self.context)

    def _restore(self, checkpoint: dict, source: Path) -> None:
        """Continue the saved run (its weights are already in): optimizer, schedule, loss scale, the objective's
        state, position and RNG."""
        saved = RunPosition.from_dict(checkpoint["position"], source)
        if saved.data != self.position.data:
            raise InputError(f"--resume {source}: --data is not the feature file the saved run trained on")
        load_optimizer = (
            functools.partial(load_sharded_optimizer_state, self.model, self.optimizer) if self.options.fsdp else None
        )
        restore_training_state(
            checkpoint, source, self.optimizer, self.scheduler, self.scaler, self.device, self.context, load_optimizer
        )
        check_counters(saved, source, self.options.epochs, self.steps_per_epoch)
        # Runs saved before objectives had a state hold none: theirs had nothing beyond the model.
        self.objective.load_state_dict(checkpoint.get("objective", {}), str(source))
        self.position = saved
        self.last_saved = source

    def run_config(self) -> dict:
        """The options, the model config and what they resolved to (printed, and given to the tracker)."""
        model = {key: value for key, value in self.config.to_dict().items() if key != "lm_config"}
        resolved = {
            "objective": self.options.objective,
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.context.world_size,
            "train_captions": len(self.train_set),  # images under --scst
            "val_captions": len(self.val_set) if self.val_set is not None else 0,
            "steps_per_epoch": self.steps_per_epoch,
            "trainable_parameters": sum(parameter.numel() for parameter in self.trainable),
            "start": {"step": self.position.step, "epoch": self.position.epoch, "best": self.position.best},
        }
        return {"options": asdict(self.options), "model": model, "resolved": resolved}

    def fit(self) -> ClipCaptionModel:
        """Train the remaining epochs; returns the (unwrapped) model."""
        if self.context.is_main:
            print(json.dumps(self.run_config(), indent=2))
        if self.position.epoch >= self.options.epochs:
            print(f"the run already finished its {self.options.epochs} epochs; nothing to do")
            return self.model
        if self.context.is_main:
            save_config_json(self.files.config_json, self.config)
        resume_step = self.position.step if self.options.resume else None
        self.log = StepLog(self.files.log, self.context.is_main, resume_step, self.tracker)
        try:
            with self.tracker.session(self.run_config(), self.position):
                for epoch in range(self.position.epoch, self.options.epochs):
                    self.train_epoch(epoch)
                    self.end_epoch(epoch)
                last = self.options.epochs - 1
                self.tracker.log_model(self.files.epoch_checkpoint(last), self.options.prefix, {"epoch": last})
        finally:
            self.log.close()
        return self.model

    def _loader(self, dataset: Dataset, indices: list[int], seed: int, collate) -> DataLoader:
        # A generator of its own: creating the loader must not draw from the global RNG (dropout's).
        return DataLoader(
            dataset,
            batch_size=self.options.batch_size,
            sampler=indices,
            collate_fn=collate,
            num_workers=self.options.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )

    def train_epoch(self, epoch: int) -> None:
        """One pass over this rank's share of the training items, from where the run stands."""
        self.network.train()
        done = self.position.batch_in_epoch
        indices = epoch_order(self.train_set, self.options.seed, epoch, self.context)[done * self.options.batch_size :]
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=done,
            desc=f"epoch {epoch}",
            disable=not self.context.is_main,
            dynamic_ncols=True,
        )
        last = time.perf_counter()
        for batch in self._loader(self.train_set, indices, self.options.seed + epoch, self.train_collate):
            stats = self.train_step(batch.to(self.device), epoch)
            now = time.perf_counter()
            samples_per_s = len(batch) * self.context.world_size / (now - last)
            last = now
            self.position.step += 1
            self.position.batch_in_epoch += 1
            self.log.write(step=self.position.step, epoch=epoch, **stats, samples_per_s=samples_per_s)
            bar.update()
            shown = {name: f"{value:.4g}" for name, value in stats.items() if name != "lr"}
            bar.set_postfix(**shown, samples_per_s=f"{samples_per_s:.1f}")
            periodic = self.options.save_latest_every and self.position.step % self.options.save_latest_every == 0
            if periodic and self.position.batch_in_epoch < self.steps_per_epoch:  # the epoch's end saves anyway
                self.check_finite_weights()
                self.save_latest()
        bar.close()
        self.position.epoch, self.position.batch_in_epoch = epoch + 1, 0

    def train_step(self, batch, epoch: int) -> dict[str, float]:
        """One optimizer step; returns what the log records of it: the loss (mean over ranks), the
        learning rate used, and the objective's figures."""
        lr = self.scheduler.get_last_lr()[0]
        loss, figures = self.objective.loss(self.network, batch)
        loss_value = self._mean_over_ranks(loss.detach().float())  # every rank sees the same value
        if not math.isfinite(loss_value):
            raise InputError(
                f"loss is {loss_value} at step {self.position.step + 1} (epoch {epoch}); training stopped "
                f"before updating the weights, {self._last_good()}. Try a lower --lr or --precision fp32"
            )
        apply_gradients(loss, self.trainable, self.optimizer, self.scheduler, self.scaler, self.options.max_grad_norm)
        return {"loss": loss_value, "lr": lr, **figures}

    def _last_good(self) -> str:
        return f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"

    def check_finite_weights(self) -> None:
        """Before any save: non-finite weights (an overflowing step) must not replace the last good checkpoint."""
        finite = bool(torch.stack([local_part(parameter).isfinite().all() for parameter in self.trainable]).all())
        if self.options.fsdp:  # each rank sees its shards: all stop or none (one alone would leave the rest waiting)
            finite = all(gather_counts(int(finite), self.context, self.device))
        if finite:
            return
        raise InputError(
            f"the weights are not finite after step {self.position.step}; training stopped without saving "
            f"them, {self._last_good()}. Try a lower --lr or --precision fp32"
        )

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.context.enabled:
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value = value / self.context.world_size
        return value.item()

    def end_epoch(self, epoch: int) -> None:
        """Epoch-end work in order: validation loss (and its best model), caption scores (--eval_every), then checkpoints."""
        self.check_finite_weights()
        record: dict = {}
        if self.val_set is not None:
            record["val_loss"] = self.validation_loss()
            self.keep_best_loss(epoch, record["val_loss"])
        last = epoch == self.options.epochs - 1
        scores: dict[str, float] = {}
        if (
            self.options.eval_every > 0
            and ((epoch + 1) % self.options.eval_every == 0 or last)
            and self.context.is_main
        ):
            scores = self.score_validation(epoch)
            record.update(scores)
        if record:
            self.log.write(step=self.position.step, epoch=epoch, **record)
            if self.context.is_main:
                tqdm.write(f"epoch {epoch}: " + ", ".join(f"{name} {value:.4f}" for name, value in record.items()))
        if epoch % self.options.save_every == 0 or last:
            # ClipCap's numbering: epochs count from 0, and the last one is always saved.
            # A scored epoch keeps its scores, as `_best.pt` does (an export's model card shows them).
            self.save(self.files.epoch_checkpoint(epoch), epoch=epoch, **({"scores": scores} if scores else {}))
        # Scoring and saving above can outlast a collective's timeout; the next collective is save_latest's.
        wait_for_main(self.main_work)
        self.save_latest()

    def score_validation(self, epoch: int) -> dict[str, float]:
        """Greedy-decode the validation images, score CIDEr and BLEU-4, keep `{prefix}_best.pt` (main process only)."""
        positions = context_length(self.model.gpt) or 10**9
        # Decoding's default caption length (ClipCap's 67), within what the LM's positions leave.
        max_length = min(DecodingOptions.max_length, positions - self.model.positions_before_caption)
        from stages.evaluate import score_captioner  # late, as require_java above

        scores, predictions = score_captioner(
            self.model,
            self.tokenizer,
            self.val_file,
            DecodingOptions(method="greedy", max_length=max_length),
            batch_size=self.options.batch_size,
            device=self.device,
            precision=self.precision,
        )
        scores = {"CIDEr": scores["CIDEr"], "Bleu_4": scores["Bleu_4"]}
        self.tracker.log_captions(predictions, self.val_file, step=self.position.step)
        best = self.position.best.get("CIDEr")
        if best is None or scores["CIDEr"] > best:
            self.position.best["CIDEr"] = scores["CIDEr"]
            self.save(self.files.best, epoch=epoch, scores=scores)
        return scores

    def keep_best_loss(self, epoch: int, val_loss: float) -> None:
        """`{prefix}_best_loss.pt` when the validation loss is the lowest so far (every rank has the same loss)."""
        best = self.position.best.get("val_loss")
        # Written so that NaN (an overflowing validation pass) never counts as the best.
        if not math.isfinite(val_loss) or (best is not None and val_loss >= best):
            return
        self.position.best["val_loss"] = val_loss
        self.save(self.files.best_loss, epoch=epoch, scores={"val_loss": val_loss})

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss per caption token over the validation captions (each rank a share, then summed)."""
        self.model.eval()
        indices = list(range(self.context.rank, len(self.val_set), self.context.world_size))
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, token count)
        collate = CaptionCollator(self.tokenizer.pad_token_id)
        for batch in self._loader(self.val_set, indices, self.options.seed, collate):
            batch = batch.to(self.device)
            loss = compute_loss(self.model, batch, self.device, self.precision)
            tokens = batch.attention_mask.sum()
            totals += torch.stack((loss.double() * tokens, tokens.double()))
        if self.options.fsdp:
            # A sharded forward is a collective: a rank with fewer batches runs uncounted ones until all have run
            # as many (the shares differ by a caption when the ranks do not divide the captions).
            batches = math.ceil(len(indices) / self.options.batch_size)
            most = math.ceil(math.ceil(len(self.val_set) / self.context.world_size) / self.options.batch_size)
            spare = collate([self.val_set[0]]).to(self.device)
            for _ in range(most - batches):
                compute_loss(self.model, spare, self.device, self.precision)
        if self.context.enabled:
            dist.all_reduce(totals)
        self.model.train()
        return (totals[0] / totals[1]).item()

    def save(self, path: Path, **extra) -> None:
        """A checkpoint of the whole model (and `extra`), written by rank 0; with --fsdp all ranks call it (the
        weights are gathered from their shards), else rank 0 alone may."""
        state = gathered_model_state(self.model) if self.options.fsdp else None
        if self.context.is_main:
            save_checkpoint(path, self.model, state, **extra)

    def save_latest(self) -> None:
        """`{prefix}_latest.pt`: weights plus everything `--resume` needs (all ranks call it). With --fsdp the
        optimizer's state is keyed by parameter name (torch.distributed.checkpoint's layout), else by index."""
        rng = gather_rng_states(self.device, self.context)
        fsdp = self.options.fsdp
        optimizer = gathered_optimizer_state(self.model, self.optimizer) if fsdp else self.optimizer.state_dict()
        self.save(
            self.files.latest,
            optimizer=optimizer,
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            position=self.position.to_dict(),
            options=self.identity(),
            runtime=self.runtime,
            rng=rng,
            objective=self.objective.state_dict(),
        )
        self.last_saved = self.files.latest


def run_training(options: TrainingOptions) -> ClipCaptionModel:
    """Train as `options` say (joining torchrun's process group when launched by it), export the final
    checkpoint with --export_hf (rank 0); returns the model."""
    check_ranges(options)  # before anything is created, the run's lock file included
    check_training_export(options)
    context, device = init_distributed(options.device)
    try:
        with RunFiles(Path(options.out_dir), options.prefix).locked(context.is_main):
            model = Trainer(options, context, device).fit()
            if options.export_hf and context.is_main:
                export_trained(options)  # under the lock: no other run replaces the checkpoint meanwhile
            return model
    finally:
        close_distributed()
