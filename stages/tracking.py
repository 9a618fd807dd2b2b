"""Experiment tracking for train.py (SCST too) and train_clip.py (`--wandb`): the run's log records, a table
of validation captions and the final model, mirrored to Weights & Biases by the main process alone.

The training loops call a Tracker through a few hooks (the step log's records, `session`, `log_captions`,
`log_model`); without --wandb, or on another rank, the Tracker does nothing. wandb is imported only when
--wandb is given. A resumed run continues the same W&B run: its id rides in the run's RunPosition, saved in
`_latest.pt`. WANDB_MODE=offline writes the run under --out_dir/wandb/ for a later `wandb sync`."""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from data.annotations import image_files, inside_images_dir
from data.errors import InputError, first_line
from data.features import FeatureFile
from data.images import ImageReadError, load_rgb
from data.options import option
from data.references import ImageId, references_from_features

DEFAULT_PROJECT = "clipcap-plus"
CAPTION_ROWS = 32  # validation images per captions table: the same first ones every time, so evaluations compare
THUMBNAIL_SIDE = 256  # a caption is judged at a glance; full-size images would make each table megabytes


@dataclass(kw_only=True)
class TrackingOptions:
    """--wandb, --wandb_project and --wandb_run_name (train.py and train_clip.py)."""

    wandb: bool = option(
        False,
        "log losses, learning rate, throughput, validation figures and the final model to W&B "
        "(needs `pip install wandb`; WANDB_MODE=offline writes the run under --out_dir/wandb/)",
        group="tracking",
    )
    wandb_project: str = option(DEFAULT_PROJECT, "W&B project", group="tracking")
    wandb_run_name: str | None = option(None, "W&B run name", shown_default="one W&B makes up", group="tracking")


TRACKING_GROUP = {"tracking": "experiment tracking (Weights & Biases)"}


def import_wandb() -> ModuleType:
    """The wandb package, or one line saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise InputError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


class Tracker:
    """Where a run's figures go besides its log: nowhere (this class: no --wandb, or a rank other than 0)."""

    @contextmanager
    def session(self, config: dict[str, Any], position: Any) -> Iterator[None]:
        """The tracked run, open while the body trains (continuing the run that `position`, the run's
        RunPosition, names in wandb_run_id)."""
        yield

    def log(self, record: dict[str, Any]) -> None:
        """One record of the step log (its "step" is the x axis)."""

    def log_captions(self, predictions: dict[ImageId, str], features: FeatureFile, step: int) -> None:
        """A table of validation images with their generated captions and references."""

    def log_model(self, path: Path, name: str, metadata: dict[str, Any]) -> None:
        """The final model (a checkpoint file or an encoder directory) as a model artifact."""


class WandbTracker(Tracker):
    """The Tracker of --wandb on the main process."""

    def __init__(self, wandb: ModuleType, project: str, run_name: str | None, out_dir: Path):
        self.wandb, self.project, self.run_name, self.out_dir = wandb, project, run_name, out_dir
        self.run = None
        self.images: dict[ImageId, Path] | None = None  # the validation images' files, found once
        self.references: dict[ImageId, list[str]] = {}  # and their references, read once

    @contextmanager
    def session(self, config: dict[str, Any], position: Any) -> Iterator[None]:
        try:
            # WANDB_MODE (online, offline, disabled) is wandb's own to read; dir= keeps the run beside its files.
            self.run = self.wandb.init(
                project=self.project,
                name=self.run_name,
                dir=str(self.out_dir),
                id=position.wandb_run_id,
                resume="allow",
                config=config,
            )
        except self.wandb.errors.Error as error:
            raise InputError(f"--wandb: {first_line(error)} (WANDB_MODE=offline logs without the network)") from None
        position.wandb_run_id = self.run.id
        try:
            yield
        except BaseException:
            self.run.finish(exit_code=1)  # marked failed; --resume continues it
            raise
        self.run.finish()

    def log(self, record: dict[str, Any]) -> None:
        self._log({key: value for key, value in record.items() if key != "step"}, record["step"])

    def _log(self, values: dict[str, Any], step: int) -> None:
        # A resumed W&B run starts past the last step it holds; the steps the interrupted run logged after its
        # last checkpoint come again (with the same values: resume is exact), and W&B would warn at each one.
        if step >= self.run.starting_step:
            self.run.log(values, step=step)

    def log_captions(self, predictions: dict[ImageId, str], features: FeatureFile, step: int) -> None:
        if self.images is None:
            self.images = self._find_images(features)
            self.references = references_from_features(features)
        columns = ["image_id", "caption", "references"] + (["image"] if self.images else [])
        table = self.wandb.Table(columns=columns)
        for image_id, caption in list(predictions.items())[:CAPTION_ROWS]:
            row = [str(image_id), caption, "\n".join(self.references[image_id])]  # str: ids may mix ints and strings
            if self.images:
                row.append(self._image(self.images.get(image_id)))
            table.add_data(*row)
        self._log({"val_captions": table}, step)

    def _find_images(self, features: FeatureFile) -> dict[ImageId, Path]:
        """The validation images' files, from the annotation file and images directory the feature file's meta
        names (parse_coco_*.py records both); none, said once, for other files (ClipCap's have no meta)."""
        captions_file, images_dir = features.meta.get("captions_file"), features.meta.get("images_dir")
        if not captions_file or not images_dir:
            print("--wandb: the validation feature file names no images; the captions table shows image ids only")
            return {}
        try:
            files = image_files(captions_file, features.meta.get("split"), images_dir)
        except InputError as error:
            print(f"--wandb: the captions table shows image ids without images: {error}")
            return {}
        # Paths the annotations lead outside the images directory are not opened (as extraction does by default).
        return {image_id: path for image_id, path in files.items() if inside_images_dir(images_dir, str(path))}

    def _image(self, path: Path | None) -> Any:
        """A thumbnail of the image for the table, or None when it cannot be read."""
        if path is None:
            return None
        try:
            image = load_rgb(path)
        except ImageReadError:
            return None
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return self.wandb.Image(image)

    def log_model(self, path: Path, name: str, metadata: dict[str, Any]) -> None:
        # Artifact names allow letters, digits, dashes, underscores and dots only.
        artifact = self.wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type="model", metadata=metadata)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)


def make_tracker(wandb: bool, project: str, run_name: str | None, out_dir: Path, is_main: bool) -> Tracker:
    """The run's Tracker: W&B on the main process with --wandb, else one that does nothing."""
    if not wandb:
        return Tracker()
    module = import_wandb()  # on every rank: a missing package stops the whole job at once
    return WandbTracker(module, project, run_name, out_dir) if is_main else Tracker()
