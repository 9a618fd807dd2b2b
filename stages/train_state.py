"""The files of a training run and the state that lets `--resume` continue it exactly: where the
run stands, RNG states of every rank, the per-step log, and the checks that a resumed run is the same run."""

import fcntl
import glob
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_write, check_output_target, check_outputs, remove_stale_temporaries
from data.errors import InputError, first_line
from models.checkpoint import read_checkpoint
from models.config import CaptionerConfig
from stages.distributed import DistributedContext, gather_objects
from stages.tracking import Tracker

# Options that decide the sequence of weights: a resumed run must keep them to reach the same weights.
TRAJECTORY_OPTIONS = (
    "batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "epochs",
    "seed",
    "only_prefix",
)  # and the precision used, which `--precision auto` leaves to the device: see check_same_runtime
# Config fields that decide the architecture (lm_config and encoder are records, not choices).
ARCHITECTURE_FIELDS = (
    "prefix_length",
    "prefix_length_clip",
    "mapping_type",
    "num_layers",
    "normalize_prefix",
    "lm_name",
    "lm_dtype",
    "lora",
    "prompt",
)


@dataclass
class RunPosition:
    """Where a run stands (train.py's and train_clip.py's alike), saved in `_latest.pt` for --resume."""

    data: str  # what the run trains on: --resume refuses other data
    step: int = 0
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch finished
    best: dict[str, float] = field(default_factory=dict)  # the best value so far of each kept model's figure
    history: list[dict] = field(default_factory=list)  # train_clip.py: each epoch's recalls
    skipped: dict[str, str] = field(default_factory=dict)  # train_clip.py: unreadable images and why
    wandb_run_id: str | None = None  # --wandb: so --resume continues the same W&B run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any], source: Path) -> "RunPosition":
        """The saved position, each entry of its type (a damaged one is one line); runs saved before this
        class kept their best values under their own keys."""
        saved = dict(saved)
        for old_key, figure in (("best_cider", "CIDEr"), ("best_val_loss", "val_loss"), ("best_rsum", "R@sum")):
            if saved.get(old_key) is not None:
                saved.setdefault("best", {})[figure] = saved[old_key]
            saved.pop(old_key, None)
        fits = {
            "data": isinstance(saved.get("data"), str),
            "best": isinstance(saved.get("best", {}), dict) and all(map(is_number, saved.get("best", {}).values())),
            "history": isinstance(saved.get("history", []), list),
            "skipped": isinstance(saved.get("skipped", {}), dict)
            and all(isinstance(item, str) for pair in saved.get("skipped", {}).items() for item in pair),
            "wandb_run_id": saved.get("wandb_run_id") is None or isinstance(saved["wandb_run_id"], str),
        }
        for name, fit in fits.items():
            if not fit:
                raise InputError(f"--resume {source}: the saved position is damaged ({name} {saved.get(name)!r:.60})")
        return cls(**{name: saved[name] for name in cls.__dataclass_fields__ if name in saved})


def is_number(value: object) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class RunFiles:
    """Paths of one run: `{prefix}-{epoch:03d}.pt`, `{prefix}_latest.pt`, `{prefix}_best.pt`, `{prefix}_best_loss.pt`,
    `{prefix}.json`, `{prefix}_log.jsonl`."""

    out_dir: Path
    prefix: str

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.out_dir / f"{self.prefix}-{epoch:03d}.pt"

    @property
    def latest(self) -> Path:
        return self.out_dir / f"{self.prefix}_latest.pt"

    @property
    def best(self) -> Path:
        return self.out_dir / f"{self.prefix}_best.pt"

    @property
    def best_loss(self) -> Path:
        return self.out_dir / f"{self.prefix}_best_loss.pt"

    @property
    def config_json(self) -> Path:
        return self.out_dir / f"{self.prefix}.json"

    @property
    def log(self) -> Path:
        return self.out_dir / f"{self.prefix}_log.jsonl"

    @property
    def fixed(self) -> list[Path]:
        """The files whose names do not change with the epoch."""
        return [self.latest, self.best, self.best_loss, self.config_json, self.log]

    @property
    def lock(self) -> Path:
        return self.out_dir / f"{self.prefix}.lock"

    @contextmanager
    def locked(self, enabled: bool = True) -> Iterator[None]:
        """Hold `{prefix}.lock` for the run: a second run with this --out_dir and --prefix would interleave
        the log and replace the checkpoints. The kernel releases the lock however the process ends."""
        if not enabled:
            yield
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock, "a+", encoding="utf-8")  # "a+": never truncates another run's PID
        except OSError as error:
            raise InputError(f"--out_dir {self.out_dir}: cannot create {self.lock.name} ({error.strerror})") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise InputError(
                    f"{self.out_dir} is in use by another run with --prefix {self.prefix} (PID {holder}, holding "
                    f"{self.lock.name}); wait for it to end, or use another --prefix or --out_dir"
                ) from None
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield  # closing the file releases the lock

    def existing(self) -> list[Path]:
        """Files of an earlier run with this prefix."""
        fixed = self.fixed
        numbered = self.out_dir.glob(f"{self.prefix}-[0-9][0-9][0-9]*.pt") if self.out_dir.is_dir() else []
        return sorted([path for path in fixed if path.exists()] + list(numbered))

    def check_free(self, overwrite: bool) -> None:
        """Refuse to start over an earlier run unless `overwrite`."""
        existing = self.existing()
        if existing and not overwrite:
            raise InputError(
                f"{self.out_dir} already holds run '{self.prefix}' ({existing[0].name}, ...): "
                f"continue it with --resume {self.out_dir}, or start over with --overwrite"
            )

    def check_apart_from(self, inputs: dict[str, str | None], epochs: int) -> None:
        """Refuse a run whose files would replace one of its inputs (e.g. --data out/run.json), or a link or device."""
        outputs = [*self.fixed, *map(self.epoch_checkpoint, range(epochs))]
        check_outputs({"output": outputs}, inputs)

    def remove_temporaries(self) -> None:
        """Delete the temporary files of this run's writes that a killed process left (--resume, --overwrite)."""
        prefix = glob.escape(self.prefix)
        for pattern in (f"{prefix}-[0-9][0-9][0-9]*.pt", *(glob.escape(path.name) for path in self.fixed)):
            remove_stale_temporaries(self.out_dir, pattern)

    def remove_existing(self) -> None:
        """Delete an earlier run's files (--overwrite): its stale epoch checkpoints would mix with the new run's."""
        for path in self.existing():
            path.unlink()


def resume_path(resume: str, prefix: str) -> Path:
    """--resume names a `_latest.pt` file, or a directory holding `{prefix}_latest.pt`."""
    path = Path(resume)
    if path.is_dir():
        path = path / f"{prefix}_latest.pt"
    if not path.is_file():
        raise InputError(f"--resume {resume}: {path} not found (runs save it every --save_latest_every steps)")
    return path


# What a `_latest.pt` holds, and of which type (a tampered one fails where it is first used, mid-run).
RESUME_KEYS = {
    "config": dict,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "position": dict,
    "options": dict,
    "rng": list,
}


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """A `_latest.pt` with everything needed to continue; anything else is one InputError line."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in RESUME_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise InputError(f"{path}: not a resumable checkpoint (lacks {', '.join(missing)}); use a {{prefix}}_latest.pt")
    for key, kind in RESUME_KEYS.items():
        if not isinstance(checkpoint[key], kind):
            raise InputError(
                f"{path}: not a resumable checkpoint ({key} is {type(checkpoint[key]).__name__}, "
                f"not {kind.__name__}); use a {{prefix}}_latest.pt"
            )
    return checkpoint


def check_counters(position: RunPosition, source: Path, epochs: int, steps_per_epoch: int) -> None:
    """The saved step, epoch and batch within it are counts this run can reach (a tampered one would skip
    or repeat batches, or fail mid-run)."""
    limits = {"step": None, "epoch": epochs, "batch_in_epoch": steps_per_epoch - 1}
    for name, limit in limits.items():
        value = getattr(position, name)
        if type(value) is not int or value < 0 or (limit is not None and value > limit):
            raise InputError(f"--resume {source}: the saved position is damaged ({name} {value!r:.60})")


def restore_training_state(
    checkpoint: dict[str, Any],
    source: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    context: DistributedContext,
    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Put back the optimizer, schedule, loss scale and this rank's RNG state of a `_latest.pt`; a tampered
    entry is one line (each loader raises its own type at one). `load_optimizer` takes the optimizer's state
    where optimizer.load_state_dict does not (--fsdp: each rank its shard of a state keyed by name)."""
    try:
        (load_optimizer or optimizer.load_state_dict)(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"], device, context)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
        raise InputError(
            f"--resume {source}: the optimizer, schedule or RNG state do not fit this run ({first_line(error)})"
        ) from None
    check_optimizer_state(optimizer, source)


def check_optimizer_state(optimizer: torch.optim.Optimizer, source: Path) -> None:
    """Every loaded moment is a tensor of its parameter's shape: load_state_dict does not look, and the
    first step would fail on a tampered one."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for value in optimizer.state.get(parameter, {}).values():
                if not isinstance(value, torch.Tensor) or (value.dim() > 0 and value.shape != parameter.shape):
                    found = f"{tuple(value.shape)}-shaped" if isinstance(value, torch.Tensor) else type(value).__name__
                    raise InputError(
                        f"--resume {source}: the optimizer's state of a {tuple(parameter.shape)}-shaped "
                        f"parameter is {found}"
                    )


def check_same_run(
    checkpoint: dict[str, Any],
    source: Path,
    config: CaptionerConfig,
    options: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> None:
    """A resumed run must have the model and options of the saved one, or it cannot reach the same weights.
    An option the saved run does not record came after it was saved: it ran with that option's default."""
    saved = CaptionerConfig.from_dict(checkpoint["config"], source=str(source))
    if saved.feature_dim != config.feature_dim:
        raise InputError(
            f"--data has {config.feature_dim}-d features, but the run in {source} was trained on "
            f"{saved.feature_dim}-d features; resume with the same feature file"
        )
    for name in ARCHITECTURE_FIELDS:
        if getattr(saved, name) != getattr(config, name):
            raise InputError(
                f"--resume {source}: {name} is {getattr(config, name)!r} here but {getattr(saved, name)!r} "
                "in the saved run; resume with the same settings"
            )
    saved_options = {**(defaults or {}), **checkpoint["options"]}
    for name in options:  # TRAJECTORY_OPTIONS, and a stage's own (SCST's)
        if saved_options.get(name) != options[name]:
            raise InputError(
                f"--resume {source}: {name} is {options[name]!r} here but {saved_options.get(name)!r} "
                "in the saved run; resume with the same settings"
            )


def runtime_record(device: torch.device, precision: str, fsdp: bool = False) -> dict[str, Any]:
    """What the run resolved `--device` and `--precision` to, and whether it sharded (--fsdp, recorded only
    then, as runs saved before it): a resumed run must compute the same way."""
    return {"device_type": device.type, "precision": precision, **({"fsdp": True} if fsdp else {})}


def check_same_runtime(checkpoint: dict[str, Any], source: Path, runtime: dict[str, str]) -> None:
    """Refuse to resume on another kind of device or precision: the arithmetic and the RNG streams differ
    (e.g. `--precision auto`: bf16 on a GPU, fp32 on a CPU), so the run cannot reach the same weights."""
    saved = checkpoint.get("runtime")
    if saved is None:  # saved before the runtime was recorded: nothing to compare with
        return
    if saved.get("fsdp", False) != runtime.get("fsdp", False):  # the optimizer's state is laid out otherwise
        sharded = saved.get("fsdp", False)
        raise InputError(
            f"--resume {source}: the saved run {'sharded' if sharded else 'did not shard'} the model with --fsdp; "
            f"resume it {'with' if sharded else 'without'} --fsdp"
        )
    if saved != runtime:
        raise InputError(
            f"--resume {source}: the saved run computed on {saved['device_type']} in {saved['precision']}, this "
            f"one would on {runtime['device_type']} in {runtime['precision']}; resume on a {saved['device_type']} "
            f"device with --precision {saved['precision']}"
        )


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG state: dropout draws from it."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def gather_rng_states(device: torch.device, context: DistributedContext) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it)."""
    return gather_objects(rng_state(device), context)  # CPU tensors, the CUDA generator's state too


def restore_rng_state(states: list[dict[str, torch.Tensor]], device: torch.device, context: DistributedContext) -> None:
    """Put back this rank's RNG state, so dropout draws what the uninterrupted run drew."""
    if len(states) != context.world_size:
        raise InputError(
            f"the saved run used {len(states)} process(es); resume it with the same number, not {context.world_size}"
        )
    state = states[context.rank]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def lines_up_to(path: Path, step: int) -> list[str]:
    """The log's lines up to `step` (the resumed checkpoint's), saying what is dropped: lines past it, and a
    torn last line (a full disk or a kill mid-write). A bad line before the end is not the log's own."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            records.append((line, int(record["step"])))
        except (ValueError, TypeError, KeyError):
            if number < len(lines):
                raise InputError(f"{path}: line {number} is not a log record; move the log aside to resume") from None
            print(f"resume: dropped the torn last line of {path}")
    kept = [line for line, line_step in records if line_step <= step]
    if len(kept) < len(records):
        print(f"resume: dropped {len(records) - len(kept)} line(s) of {path} past step {step}, the checkpoint's")
    return kept


class StepLog:
    """The per-step JSON-lines log; only the main process writes. On resume, lines past the resumed
    step (written after the last `_latest.pt`) are dropped, so each step appears once. Every record
    also goes to the run's tracker (W&B with --wandb)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tracker: Tracker | None = None):
        self.handle, self.path, self.tracker = None, path, tracker or Tracker()
        if not enabled:
            return
        check_output_target(path)  # appending through a link would write into another directory
        if resume_step is not None and path.is_file():
            kept = lines_up_to(path, resume_step)
            with atomic_write(path, "w") as handle:
                handle.write("".join(f"{line}\n" for line in kept))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a" if resume_step is not None else "w", buffering=1)  # closed in close()

    def write(self, **record: Any) -> None:
        """One JSON line (step, epoch, and the figures of that step or epoch), mirrored to the tracker."""
        if self.handle is not None:
            try:
                self.handle.write(json.dumps(record) + "\n")
            except OSError as error:  # a full disk: one line naming the log, as the atomic writers give
                raise InputError(f"{self.path}: cannot write ({error.strerror or error})") from None
        self.tracker.log(record)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
