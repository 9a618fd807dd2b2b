"""Stage 0's two sides. Images: the tower train_clip.py starts from (a torchvision ResNet-50, a tiny CNN, or
a CLIP / DINOv2 vision model by name, id or directory through `load_encoder`) with a projection head to
the text embedding's width, and the preprocessing it will be saved with. Captions: a split's captions,
flat, one drawn per image per epoch, and a frozen text tower's embeddings of them, cached."""

import argparse
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
from torchvision.models import ResNet50_Weights, resnet50
from transformers import PreTrainedTokenizerBase
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data.annotations import ImageRecord, read_annotations
from data.captions import check_captions_have_tokens, tokenizer_fingerprint
from data.embedding_cache import cache_path, read_cached_embeddings, write_cached_embeddings
from data.errors import InputError
from models.aligned import RESNET50_WIDTH, AlignedConfig, AlignedImageEncoder, HubTower, ResNetTower, TinyCNN
from models.clip_score import ClipScorer, clip_name
from models.encoders import load_encoder

# Towers built here; any other --image_encoder goes to load_encoder (CLIP vision towers, DINOv2).
LOCAL_TOWERS = ("resnet50", "tiny_cnn")
PreprocessSettings = tuple[int, int, list[float], list[float]]  # resize_dim, crop_dim, mean, std


def pretrained_resnet50() -> ResNetTower:
    """torchvision's ResNet-50 with its ImageNet weights (downloaded once into torch's hub cache)."""
    try:
        return ResNetTower(resnet50(weights=ResNet50_Weights.IMAGENET1K_V2))
    except (OSError, URLError, RuntimeError) as error:  # offline: URLError; a torn cache file: RuntimeError
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"--image_encoder resnet50: cannot load torchvision's ImageNet weights ({reason}); put "
            f"{ResNet50_Weights.IMAGENET1K_V2.url.rsplit('/', 1)[-1]} in $TORCH_HOME/hub/checkpoints, "
            "or pass --no_pretrained for random initialization"
        ) from None


def _local_tower(args: argparse.Namespace) -> tuple[object, str, int, dict]:
    """(tower, kind, width, tower_config) of a tower built here."""
    if args.image_encoder == "resnet50":
        tower = ResNetTower() if args.no_pretrained else pretrained_resnet50()
        return tower, "resnet50", RESNET50_WIDTH, {}
    channels = list(args.cnn_channels)
    if not channels or min(channels) < 1:
        raise InputError(f"--cnn_channels {channels}: give one positive width per convolution")
    if args.cnn_stem < 1:
        raise InputError(f"--cnn_stem {args.cnn_stem}: must be at least 1")
    tower_config = {"channels": channels, "stem": args.cnn_stem}
    return TinyCNN(channels, args.cnn_stem), "tiny_cnn", 2 * channels[-1], tower_config  # mean and max pooled


def build_image_side(args: argparse.Namespace, text_dim: int) -> tuple[AlignedImageEncoder, PreprocessSettings]:
    """The encoder to train (tower + fresh projection head to `text_dim`) and its preprocessing settings."""
    if args.image_encoder in LOCAL_TOWERS:
        tower, kind, width, tower_config = _local_tower(args)
        size = args.image_size or 224
        if size < 16:
            raise InputError(f"--image_size {size}: must be at least 16")
        settings: PreprocessSettings = (size, size, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
    else:
        if args.no_pretrained:
            raise InputError("--no_pretrained is for --image_encoder resnet50; a named model loads its own weights")
        try:
            # The family's first feature type: CLIP's image_embeds, DINOv2's CLS token.
            frozen, _ = load_encoder(args.image_encoder, crop_dim=args.image_size, resize_dim=args.image_size)
        except InputError as error:
            raise InputError(f"--image_encoder: not {' or '.join(LOCAL_TOWERS)}, and {error}") from None
        spec = frozen.spec
        if spec.family == "aligned":
            raise InputError(f"--image_encoder {args.image_encoder}: already aligned; align its tower by name instead")
        # load_encoder hands the model frozen; here it is trained.
        model = frozen.model.requires_grad_(True).train()
        kind = spec.family
        width = spec.feature_dim if kind == "clip" else model.config.hidden_size  # image_embeds, or the CLS token
        tower, tower_config = HubTower(model, kind), model.config.to_dict()
        settings = (spec.resize_dim, spec.crop_dim, spec.mean, spec.std)
    hidden = args.projection_hidden or max(text_dim, width // 2)  # the lab's 2048 -> 1024 -> 512
    resize_dim, crop_dim, mean, std = settings
    config = AlignedConfig(
        tower=kind,
        tower_dim=width,
        projection_hidden=hidden,
        feature_dim=text_dim,
        resize_dim=resize_dim,
        crop_dim=crop_dim,
        mean=mean,
        std=std,
        tower_config=tower_config,
        source={
            "image_encoder": args.image_encoder,
            "pretrained": not args.no_pretrained,
            "text_encoder": args.text_encoder,
            # Where its embeddings live: the frozen text tower's space (models.aligned.aligned_text_space).
            "text_space": None if args.train_text else clip_name(args.text_encoder),
        },
    )
    return AlignedImageEncoder(config, tower), settings


@dataclass
class CaptionedImages:
    """The images of a split and their captions, flat: caption j belongs to image `caption_image[j]`."""

    records: list[ImageRecord]
    paths: list[Path]
    texts: list[str]
    offsets: list[int]  # captions of image i: texts[offsets[i]:offsets[i + 1]]

    @classmethod
    def read(cls, captions_file: str, split: str | None, images_dir: str) -> "CaptionedImages":
        records = read_annotations(captions_file, split, images_dir)
        offsets = [0]
        for record in records:
            offsets.append(offsets[-1] + len(record.captions))
        texts = [caption for record in records for caption in record.captions]
        return cls(records, [Path(images_dir) / record.file_path for record in records], texts, offsets)

    def check_tokens(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse captions most of which tokenize to nothing (all empty), as train.py refuses its own."""
        chunk = 10_000  # COCO's 600k captions at once would hold every one's encoding in memory
        counts = [
            len(ids)
            for start in range(0, len(self.texts), chunk)
            for ids in tokenizer(self.texts[start : start + chunk], add_special_tokens=False)["input_ids"]
        ]
        check_captions_have_tokens(torch.tensor(counts, dtype=torch.int64), tokenizer, "text tower")

    def caption_image(self) -> torch.Tensor:
        """(M,) the image index of each caption."""
        counts = torch.tensor([len(record.captions) for record in self.records])
        return torch.repeat_interleave(torch.arange(len(self.records)), counts)

    def draw_captions(self, seed: int, epoch: int) -> torch.Tensor:
        """(N,) one caption index (into `texts`) per image for this epoch: a pure function of seed and epoch."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        counts = torch.tensor([len(record.captions) for record in self.records], dtype=torch.float64)
        within = (torch.rand(len(self.records), generator=generator, dtype=torch.float64) * counts).long()
        return torch.tensor(self.offsets[:-1]) + within


def text_model_key(scorer: ClipScorer) -> str:
    """What decides a caption's embedding: the text tower's weights and the tokenizer (hashed)."""
    digest = hashlib.sha256(tokenizer_fingerprint(scorer.tokenizer).encode())
    digest.update(str(scorer.max_tokens).encode())
    for name, tensor in scorer.text_encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_text_embeddings(
    scorer: ClipScorer, texts: list[str], cache_dir: Path, model_key: str, main: bool
) -> torch.Tensor:
    """(M, D) normalized embeddings of `texts`: from the cache when it holds them, else computed, and cached
    by the `main` process (the one that reports; torchrun's rank 0)."""
    path = cache_path(cache_dir, model_key, texts)
    width = scorer.model.config.projection_dim
    embeddings = read_cached_embeddings(path, len(texts), width)
    if embeddings is not None:
        if main:
            print(f"text embeddings of {len(texts)} captions from the cache ({path.name})")
        return embeddings
    start = time.perf_counter()
    embeddings = scorer.text_embeddings(texts).cpu()
    if main:
        print(f"embedded {len(texts)} captions with the frozen text tower in {time.perf_counter() - start:.1f} s")
        write_cached_embeddings(path, embeddings)
    return embeddings
