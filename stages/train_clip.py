"""Stage 0 behind train_clip.py: align an image encoder to a CLIP text tower with the symmetric InfoNCE
loss, one random caption per image per epoch, Recall@1/5/10 both ways on a validation split each epoch
(`retrieval.json`), and the best epoch's encoder kept as `{out_dir}/encoder`, a directory `load_encoder`
opens like any other. With the text tower frozen (the default) every caption is embedded once and cached.

The run's files, lock, resume checks, RNG states and step log are Stage 2's (stages/train_state.py), and
so are the epoch order, the gradient step and torchrun's process group. Under torchrun each process takes
its share of every epoch's images, the InfoNCE batch is all processes' batches together (CLIP's; an image
repeated to pad the epoch counts once), and rank 0 alone embeds the frozen captions, validates and writes,
while the others wait."""

import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.atomic import check_outputs, torch_save_atomic, write_json_atomic
from data.captions import default_cache_dir
from data.embedding_cache import texts_fingerprint
from data.errors import InputError
from data.images import ImageDataset, collate_images
from data.options import check_ranges
from models.aligned import AlignedImageEncoder, save_aligned_encoder
from models.clip_score import ClipScorer
from models.contrastive import ContrastivePair, retrieval_recall
from models.device import autocast, resolve_precision
from models.encoders import EncoderSpec, Preprocess, build_preprocess
from stages.align_sides import CaptionedImages, build_image_side, cached_text_embeddings, text_model_key
from stages.distributed import (
    DistributedContext,
    close_distributed,
    gather_counts,
    gather_objects,
    init_distributed,
    main_work_group,
    wait_for_main,
)
from stages.extract import iter_encoded_batches
from stages.tracking import make_tracker
from stages.train import apply_gradients, epoch_order
from stages.train_clip_options import SCHEDULES, AlignmentOptions
from stages.train_state import (
    RunFiles,
    RunPosition,
    StepLog,
    check_counters,
    check_same_runtime,
    gather_rng_states,
    is_number,
    read_resume_checkpoint,
    restore_training_state,
    resume_path,
    runtime_record,
)

RUN_PREFIX = "align"  # {out_dir}/align_latest.pt, align_log.jsonl, align.lock
# Flags that decide the sequence of weights: a resumed run must keep them.
TRAJECTORY = (
    "image_encoder",
    "no_pretrained",
    "text_encoder",
    "train_text",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "epochs",
    "seed",
    "image_size",
    "projection_hidden",
    "cnn_channels",
    "cnn_stem",
    "max_grad_norm",
)
RECALL_COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "R@sum")
HISTORY_FIELDS = ("epoch", "step", *RECALL_COLUMNS)  # what retrieval.json and the table read of an epoch


class EncoderView(nn.Module):
    """The encoder under training, seen as an ImageEncoder by extraction's batch loop (without freezing it)."""

    def __init__(self, model: AlignedImageEncoder, spec: EncoderSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels).float()


class AlignmentTrainer:
    """One alignment run: the pair being trained, its optimizer and schedule, the data, and where it stands."""

    def __init__(self, args: AlignmentOptions, context: DistributedContext, device: torch.device):
        self.args, self.context, self.device = args, context, device
        self.precision = resolve_precision(args.precision, device)
        self.runtime = runtime_record(device, self.precision)
        self.out_dir = Path(args.out_dir)
        self.files = RunFiles(self.out_dir, RUN_PREFIX)
        self.retrieval_file, self.encoder_dir = self.out_dir / "retrieval.json", self.out_dir / "encoder"
        self.skipped_file = self.out_dir / "skipped_images.json"
        inputs = {"--captions_file": args.captions_file, "--val_captions_file": args.val_captions_file}
        outputs = {"output": [*self.files.fixed, self.retrieval_file, self.skipped_file]}
        check_outputs(outputs, inputs)
        self.tracker = make_tracker(args.wandb, args.wandb_project, args.wandb_run_name, self.out_dir, context.is_main)
        checkpoint = None
        if args.resume:
            source = resume_path(args.resume, RUN_PREFIX)
            checkpoint = read_resume_checkpoint(source)
            check_same_runtime(checkpoint, source, self.runtime)
            self._check_same_options(checkpoint, source)
        else:
            self._check_free()
        self.train_data, self.val_data = self._read_data()

        self.main_work = main_work_group(context)  # the other ranks wait there while rank 0 works alone
        self.scorer = ClipScorer(args.text_encoder, device, args.eval_batch_size, purpose="--text_encoder")
        for data in (self.train_data, self.val_data):
            data.check_tokens(self.scorer.tokenizer)
        text_dim = self.scorer.model.config.projection_dim
        torch.manual_seed(args.seed)  # the projection head's (and a random tower's) initial weights
        self.image_encoder, self.preprocess_settings = build_image_side(args, text_dim)
        resize_dim, crop_dim, mean, std = self.preprocess_settings
        self.preprocess: Preprocess = build_preprocess(resize_dim, crop_dim, mean, std)
        self.spec = EncoderSpec(
            "aligned", str(self.encoder_dir.resolve()), "projected", *self.preprocess_settings, text_dim
        )
        self.train_table = self.val_table = None
        self.model = ContrastivePair(self.image_encoder, self._text_tower()).to(device)
        self.trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train_data.records) / context.world_size) / args.batch_size)
        self.optimizer, self.scheduler = self._optimizer_and_schedule()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.position = RunPosition(
            data=texts_fingerprint([str(path) for path in self.train_data.paths] + self.train_data.texts)
        )
        if checkpoint is not None:
            self._restore(checkpoint, source)  # each rank's RNG state too: not to be seeded over
        else:
            torch.manual_seed(args.seed + context.rank)  # dropout differs between ranks
        self.cached_pixels = None
        if args.cache_images:
            self.cache_pixels()
        device_ids = [device.index] if device.type == "cuda" else None
        self.network = DistributedDataParallel(self.model, device_ids=device_ids) if context.enabled else self.model
        if (args.resume or args.overwrite) and context.is_main:
            self.files.remove_temporaries()

    def _read_data(self) -> tuple[CaptionedImages, CaptionedImages]:
        """The training and the validation images with their captions."""
        args = self.args
        if args.val_captions_file is None and args.val_split == args.split:
            raise InputError(f"--val_split {args.val_split} is the training split; validate on held-out images")
        train_data = CaptionedImages.read(args.captions_file, args.split, args.images_dir)
        val_data = CaptionedImages.read(args.val_captions_file or args.captions_file, args.val_split, args.images_dir)
        return train_data, val_data

    def _text_tower(self) -> torch.nn.Module | None:
        """The text tower trained with --train_text; else None, its caption embeddings cached once."""
        if self.args.train_text:
            return self.scorer.text_encoder.requires_grad_(True)
        self.train_table, self.val_table = self.frozen_text_tables()
        self.scorer.model.to("cpu")  # frozen and cached: the text tower is not needed on the device again
        return None

    def _optimizer_and_schedule(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW over the trainable weights (no decay on the temperature) and --schedule's learning rates."""
        args = self.args
        no_decay = [self.model.log_logit_scale]  # decay would pull the temperature toward 1
        decay = [parameter for parameter in self.trainable if parameter is not self.model.log_logit_scale]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
        )
        return optimizer, SCHEDULES[args.schedule](optimizer, args.warmup_steps, args.epochs * self.steps_per_epoch)

    def frozen_text_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) cached embeddings of the training and the validation captions. Rank 0 embeds and caches
        them while the other ranks wait; they then read its cache (and embed only where it is not shared)."""
        cache_dir = Path(self.args.cache_dir) if self.args.cache_dir else default_cache_dir()
        key = text_model_key(self.scorer)

        def tables() -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(
                cached_text_embeddings(self.scorer, data.texts, cache_dir, key, self.context.is_main)
                for data in (self.train_data, self.val_data)
            )

        embeddings = tables() if self.context.is_main else None
        wait_for_main(self.main_work)  # COCO's captions take rank 0 minutes: longer than a collective waits
        return embeddings if self.context.is_main else tables()

    def _check_free(self) -> None:
        existing = [path for path in (*self.files.existing(), self.retrieval_file, self.encoder_dir) if path.exists()]
        if existing and not self.args.overwrite:
            raise InputError(
                f"{self.out_dir} already holds an alignment run ({existing[0].name}, ...): continue it with "
                f"--resume {self.out_dir}, or start over with --overwrite"
            )

    def _check_same_options(self, checkpoint: dict, source: Path) -> None:
        for name in TRAJECTORY:
            saved, given = checkpoint["options"].get(name), getattr(self.args, name)
            if saved != given:
                raise InputError(
                    f"--resume {source}: {name} is {given!r} here but {saved!r} in the saved run; resume with the same settings"
                )

    def _restore(self, checkpoint: dict, source: Path) -> None:
        saved = RunPosition.from_dict(checkpoint["position"], source)
        if saved.data != self.position.data:
            raise InputError(f"--resume {source}: the training images or captions differ from the saved run's")
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise InputError(
                f"--resume {source}: the weights do not fit this model ({str(error).splitlines()[0]})"
            ) from None
        if not self.weights_finite():
            raise InputError(f"--resume {source}: the saved weights are not finite")
        restore_training_state(checkpoint, source, self.optimizer, self.scheduler, self.scaler, self.device, self.context)
        check_counters(saved, source, self.args.epochs, self.steps_per_epoch)  # after the process count's check
        history_fits = all(
            isinstance(record, dict) and all(map(is_number, map(record.get, HISTORY_FIELDS))) for record in saved.history
        )
        if not history_fits:  # retrieval.json and the recall table read these
            raise InputError(f"--resume {source}: the saved position is damaged (history {saved.history!r:.60})")
        self.position = saved

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite."""
        return bool(torch.stack([parameter.isfinite().all() for parameter in self.trainable]).all())

    def fit(self) -> dict:
        """Train the remaining epochs; returns the retrieval record (every epoch, and the best)."""
        resolved = {"device": str(self.device), "precision": self.precision, "world_size": self.context.world_size}
        resolved |= {"train_images": len(self.train_data.records), "val_images": len(self.val_data.records)}
        resolved |= {"steps_per_epoch": self.steps_per_epoch, "encoder": self.spec.to_dict()}
        resolved["trainable_parameters"] = sum(parameter.numel() for parameter in self.trainable)
        config = {**vars(self.args), **resolved}
        if self.context.is_main:
            print("config:", *(f"  {key}: {value}" for key, value in config.items()), sep="\n")
        if self.position.epoch >= self.args.epochs:
            if self.context.is_main:
                print(f"the run already finished its {self.args.epochs} epochs; nothing to do")
            return self.retrieval_record()
        resume_step = self.position.step if self.args.resume else None
        self.log = StepLog(self.files.log, self.context.is_main, resume_step, self.tracker)
        try:
            with self.tracker.session(config, self.position):
                for epoch in range(self.position.epoch, self.args.epochs):
                    self.train_epoch(epoch)
                    self.end_epoch(epoch)
                self.tracker.log_model(self.encoder_dir, f"{RUN_PREFIX}-encoder", self.retrieval_record()["best"])
        finally:
            self.log.close()
        return self.retrieval_record()

    def train_epoch(self, epoch: int) -> None:
        """One pass over this rank's share of the images, each with its caption drawn for this epoch."""
        self.network.train()
        done = self.position.batch_in_epoch
        order = epoch_order(self.train_data.records, self.args.seed, epoch, self.context)[done * self.args.batch_size :]
        captions = self.train_data.draw_captions(self.args.seed, epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch}", disable=not self.context.is_main)
        last = time.perf_counter()
        for indices, pixels, failures in self.batches(order, epoch):
            for index, reason in failures:  # reported at the epoch's end; never fatal
                self.position.skipped[str(self.train_data.paths[index])] = reason
            # Every rank steps or none does (DDP and the gathered batch need them all): InfoNCE needs a
            # negative, and a rank whose every image of the batch is unreadable has nothing to forward.
            batch_sizes = gather_counts(len(indices), self.context, self.device)
            if min(batch_sizes) > 0 and sum(batch_sizes) > 1:
                stats = self.train_step(pixels, indices, captions[indices], batch_sizes, epoch)
                now = time.perf_counter()
                stats["images_per_s"] = sum(batch_sizes) / (now - last)
                last = now
                self.log.write(step=self.position.step, epoch=epoch, **stats)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", scale=f"{stats['logit_scale']:.1f}")
            self.position.batch_in_epoch += 1
            bar.update()
            every = self.args.save_latest_every
            if every and self.position.step % every == 0 and self.position.batch_in_epoch < self.steps_per_epoch:
                self.save_latest()
        bar.close()
        self.position.epoch, self.position.batch_in_epoch = epoch + 1, 0

    def _loader(self, indices: list[int], seed: int) -> DataLoader:
        return DataLoader(
            ImageDataset(self.train_data.paths, self.preprocess, self.spec.resize_dim),
            batch_size=self.args.batch_size,
            sampler=indices,
            collate_fn=collate_images,
            num_workers=self.args.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # not the global RNG (dropout's)
        )

    def cache_pixels(self) -> None:
        """--cache_images: decode and preprocess every training image once, for every epoch (no augmentation,
        so each epoch would compute the same pixels again); unreadable ones are skipped here, once."""
        rows: dict[int, torch.Tensor] = {}
        loader = self._loader(list(range(len(self.train_data.paths))), self.args.seed)
        for indices, pixels, failures in tqdm(loader, desc="decoding images", disable=not self.context.is_main):
            rows.update(zip(indices, pixels if pixels is not None else []))
            for index, reason in failures:
                self.position.skipped[str(self.train_data.paths[index])] = reason
        self.cached_row = {index: row for row, index in enumerate(sorted(rows))}
        self.cached_pixels = torch.stack([rows[index] for index in sorted(rows)]) if rows else None

    def batches(self, order: list[int], epoch: int) -> Iterator[tuple[list[int], torch.Tensor | None, list]]:
        """(image indices, pixels, failures) per batch of `order`: decoded now, or from the --cache_images store."""
        if self.cached_pixels is None:
            yield from self._loader(order, self.args.seed + epoch)
            return
        for start in range(0, len(order), self.args.batch_size):
            indices = [index for index in order[start : start + self.args.batch_size] if index in self.cached_row]
            pixels = self.cached_pixels[[self.cached_row[index] for index in indices]] if indices else None
            yield indices, pixels, []

    def train_step(
        self, pixels: torch.Tensor, indices: list[int], caption_ids: torch.Tensor, batch_sizes: list[int], epoch: int
    ) -> dict[str, float]:
        """One optimizer step on (image, caption) pairs, every rank's `batch_sizes` of them together (an image
        of `indices` repeated on another rank counted once); returns the loss (of all of them: the same on
        every rank), lr and scale."""
        lr = self.scheduler.get_last_lr()[0]
        pixels = pixels.to(self.device, non_blocking=True)
        gathered = {}  # one process: its batch alone, a permutation's slice (no image twice)
        if self.context.enabled:
            gathered = {"batch_sizes": batch_sizes, "image_ids": torch.tensor(indices, device=self.device)}
        with autocast(self.device, self.precision):
            if self.train_table is not None:
                text = {"text_embeds": self.train_table[caption_ids].to(self.device)}
            else:
                texts = [self.train_data.texts[index] for index in caption_ids.tolist()]
                text = {"text_inputs": self.scorer.tokenize(texts)}
            output = self.network(pixels, **text, **gathered)
        loss = output.loss.detach().float()
        if not math.isfinite(loss.item()):
            raise InputError(
                f"loss is {loss.item()} at step {self.position.step + 1} (epoch {epoch}); try a lower --lr"
            )
        apply_gradients(
            output.loss, self.trainable, self.optimizer, self.scheduler, self.scaler, self.args.max_grad_norm
        )
        self.model.clamp_logit_scale()
        self.position.step += 1
        return {"loss": loss.item(), "lr": lr, "logit_scale": output.logit_scale.item()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Recall@1/5/10 both ways on the validation split (main process); unreadable images left out."""
        view = EncoderView(self.model.image_encoder, self.spec)
        rows: dict[int, torch.Tensor] = {}
        batches = iter_encoded_batches(
            view,
            self.preprocess,
            self.val_data.paths,
            batch_size=self.args.eval_batch_size,
            num_workers=self.args.num_workers,
            device=self.device,
            precision=self.precision,
            progress=False,
        )
        for batch in batches:
            rows.update(zip(batch.indices, batch.features))
            for index, reason in batch.failures:
                self.position.skipped[str(self.val_data.paths[index])] = reason
        if not rows:
            raise InputError(f"no image of --val_split {self.args.val_split} could be read")
        kept = sorted(rows)
        row_of = {image: row for row, image in enumerate(kept)}
        caption_image = self.val_data.caption_image()
        keep = torch.tensor([int(image) in row_of for image in caption_image.tolist()])
        if self.val_table is not None:
            texts = self.val_table
        else:
            self.model.eval()
            texts = self.scorer.text_embeddings(self.val_data.texts).cpu()
        text_image = torch.tensor([row_of[int(image)] for image in caption_image[keep].tolist()])
        return retrieval_recall(torch.stack([rows[image] for image in kept]), texts[keep], text_image)

    def end_epoch(self, epoch: int) -> None:
        """Validation recall, retrieval.json, the best encoder, skipped images; then the resume checkpoint."""
        if not self.weights_finite():
            raise InputError(f"the weights are not finite after epoch {epoch}; nothing saved. Try a lower --lr")
        for share in gather_objects(self.position.skipped, self.context):  # each rank met its own images'
            self.position.skipped.update(share)
        if self.context.is_main:
            recall = self.evaluate()
            record = {"epoch": epoch, "step": self.position.step, **recall}
            record["logit_scale"] = self.model.logit_scale().item()
            self.position.history.append(record)
            best = self.position.best.get("R@sum")
            if best is None or recall["R@sum"] > best:
                self.position.best["R@sum"] = recall["R@sum"]
                self.save_encoder(epoch, recall)
            write_json_atomic(self.retrieval_file, self.retrieval_record())
            self.log.write(step=self.position.step, epoch=epoch, **recall)
            tqdm.write(format_recall_row(record, header=epoch == 0 or len(self.position.history) == 1))
            if self.position.skipped:
                write_json_atomic(self.skipped_file, self.position.skipped)
                tqdm.write(
                    f"{len(self.position.skipped)} unreadable image(s) skipped, listed in {self.skipped_file}"
                )
        wait_for_main(self.main_work)
        self.save_latest()

    def retrieval_record(self) -> dict:
        """retrieval.json: every epoch's recalls, and the best epoch's (whose encoder is kept)."""
        history = self.position.history
        best = max(history, key=lambda record: record["R@sum"]) if history else None
        return {"epochs": history, "best": best, "encoder": str(self.encoder_dir)}

    def save_encoder(self, epoch: int, recall: dict[str, float]) -> None:
        """`{out_dir}/encoder`: written beside it, then swapped in, so the directory is always whole."""
        self.image_encoder.config.source.update(epoch=epoch, retrieval=recall)
        fresh, old = self.out_dir / ".encoder.new", self.out_dir / ".encoder.old"
        for path in (fresh, old):
            shutil.rmtree(path, ignore_errors=True)
        save_aligned_encoder(fresh, self.image_encoder)
        if self.encoder_dir.exists():
            os.replace(self.encoder_dir, old)
        os.replace(fresh, self.encoder_dir)
        shutil.rmtree(old, ignore_errors=True)

    def save_latest(self) -> None:
        """`align_latest.pt`: weights plus everything --resume needs (all ranks call it; weights_only-loadable)."""
        rng = gather_rng_states(self.device, self.context)
        if not self.context.is_main:
            return
        torch_save_atomic(
            {
                "config": self.image_encoder.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "position": self.position.to_dict(),
                "options": {name: getattr(self.args, name) for name in TRAJECTORY},
                "runtime": self.runtime,
                "rng": rng,
            },
            self.files.latest,
        )


def format_recall_row(record: dict, header: bool = False) -> str:
    """One epoch's recalls as a table row (with the header line when asked)."""
    row = f"{record['epoch']:>5} " + " ".join(f"{record[name]:>8.1f}" for name in RECALL_COLUMNS)
    return (f"{'epoch':>5} " + " ".join(f"{name:>8}" for name in RECALL_COLUMNS) + "\n" + row) if header else row


def format_retrieval_table(retrieval: dict) -> str:
    """Every epoch's recalls and the best epoch's, as printed at the end of a run."""
    lines = [format_recall_row(record, header=number == 0) for number, record in enumerate(retrieval["epochs"])]
    if retrieval["best"] is not None:
        lines.append(
            f"best epoch {retrieval['best']['epoch']} (R@sum {retrieval['best']['R@sum']:.1f}): {retrieval['encoder']}"
        )
    return "\n".join(lines)


def run_alignment(args: AlignmentOptions) -> dict:
    """train_clip.py's run (joining torchrun's process group when launched by it); returns retrieval.json's record."""
    check_ranges(args)
    if not Path(args.images_dir).is_dir():
        raise InputError(f"--images_dir {args.images_dir}: no such directory")
    context, device = init_distributed(args.device)
    try:
        with RunFiles(Path(args.out_dir), RUN_PREFIX).locked(context.is_main):
            trainer = AlignmentTrainer(args, context, device)
            retrieval = trainer.fit()
        if context.is_main:
            print(format_retrieval_table(retrieval))
        return retrieval
    finally:
        close_distributed()
