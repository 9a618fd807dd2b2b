"""train.py's options, and the model config they make together with the feature file."""

from dataclasses import dataclass
from pathlib import Path

from data.errors import InputError
from data.features import TEXT_MODALITY, FeatureFile
from data.options import UsageRule, option
from models.config import LM_DTYPES, CaptionerConfig
from models.device import DEVICE_HELP, PRECISION_HELP, PRECISIONS
from models.encoders import DINOV2_MODELS
from models.lm import lora_targets, pretrained_lm_config
from models.mappers import MAPPERS
from stages.rewards import BASELINES, REWARDS, UNPAIRED_REWARDS
from stages.tracking import TRACKING_GROUP, TrackingOptions

GROUPS = {
    "clipcap": "ClipCap's flags",
    "ours": "this repo's flags",
    "scst": "SCST: self-critical fine-tuning of a train.py checkpoint (Stage 2b); the first six also --unpaired's",
    "unpaired": "unpaired adversarial training with a CLIP reward (CgT-GAN): images and a sentence corpus, never paired",
    **TRACKING_GROUP,
}
# Flags given where they do not apply are usage errors. "model": under --scst and --unpaired the --init_from
# checkpoint's config decides the model; "sampling": theirs (both sample captions from --init_from); "scst",
# "unpaired": each one's own; "prefix_mapper": the prefix mappers' (xattn has none).
# "cross_entropy": the cross-entropy objective's own.
USAGE_RULES = (
    UsageRule("model", lambda options: options.scst, "--scst takes the model from --init_from's config; do not give {flags}"),
    UsageRule("model", lambda options: options.unpaired, "--unpaired takes the model from --init_from's config; do not give {flags}"),
    UsageRule("sampling", lambda options: not (options.scst or options.unpaired), "{flags}: only with --scst or --unpaired"),
    UsageRule("scst", lambda options: not options.scst, "{flags}: only with --scst"),
    UsageRule("unpaired", lambda options: not options.unpaired, "{flags}: only with --unpaired"),
    UsageRule("one_objective", lambda options: options.scst, "{flags}: not with --scst (give one of them)"),
    UsageRule("prefix_mapper", lambda options: options.mapping_type == "xattn", "{flags}: --mapping_type xattn has no prefix mapper"),
    UsageRule("lora", lambda options: options.lora_r == 0, "{flags}: only with --lora_r (LoRA adapters)"),
    UsageRule("cross_entropy", lambda options: options.objective != "cross_entropy", "{flags}: cross-entropy training only"),
    UsageRule("fsdp", lambda options: options.fsdp, "{flags}: not with --fsdp, which shards a cross-entropy fine-tune of the whole LM (--only_prefix: nothing to shard, train under plain torchrun; decoding, as --scst and --eval_every do, is not sharded)"),
)  # fmt: skip


@dataclass(kw_only=True)
class TrainingOptions(TrackingOptions):
    """train.py's flags, ClipCap's names first: each one's default, help, range and usage, defined once."""

    data: str = option(
        help="training features (from parse_coco_clip.py / parse_coco_dino.py): a .pkl (ClipCap's too) or a store "
        "directory",
        group="clipcap",
    )
    out_dir: str = option("./checkpoints", "directory for checkpoints, config JSON and the loss log", group="clipcap")
    prefix: str = option("coco_prefix", "file-name prefix of this run's outputs", group="clipcap")
    epochs: int = option(10, "passes over the training captions", minimum=1, group="clipcap")
    save_every: int = option(
        1, "save {prefix}-{epoch:03d}.pt every N epochs (the last is always saved)", minimum=1, group="clipcap"
    )
    prefix_length: int = option(
        10, "P: LM embeddings the mapper produces", minimum=1, group="clipcap", usage=("model", "prefix_mapper")
    )
    prefix_length_clip: int = option(
        10,
        "transformer mapper: tokens the image feature becomes",
        minimum=1,
        group="clipcap",
        usage=("model", "prefix_mapper"),
    )
    batch_size: int = option(
        40,
        "captions per batch (per process under torchrun); images per batch under --scst and --unpaired",
        flag="bs",
        minimum=1,
        group="clipcap",
    )
    only_prefix: bool = option(
        False,
        "train the mapper only (xattn: and the new cross-attention layers); the LM stays frozen and out of "
        "checkpoints",
        group="clipcap",
        usage=("model", "fsdp"),
    )
    mapping_type: str = option(
        "mlp",
        "mapper architecture; xattn: GPT-2 gains cross-attention layers (an encoder-decoder's decoder uses its own) "
        "over a projection of patch-token features (--feature_type patch_tokens at extraction), with no prefix",
        choices=sorted(MAPPERS),
        group="clipcap",
        usage=("model",),
    )
    num_layers: int = option(
        8, "transformer mapper depth", minimum=1, group="clipcap", usage=("model", "prefix_mapper")
    )
    normalize_prefix: bool = option(
        False, "L2-normalize image features before the mapper", group="clipcap", usage=("model",)
    )
    use_dino: bool = option(
        False,
        "the features are DINOv2's (checked against the file's meta when it has one)",
        group="clipcap",
        usage=("model",),
    )
    dino_model_type: str | None = option(
        None,
        "DINOv2 model the features came from (checked against the file's meta; the encoder is recorded from the "
        "meta)",
        group="clipcap",
        usage=("model",),
    )
    dino_feature_dim: int | None = option(
        None,
        "expected feature width, checked against the file (the width always comes from the file)",
        group="clipcap",
        usage=("model",),
    )
    lm: str = option(
        "gpt2",
        "the language model: a transformers id of a causal LM (gpt2 ... gpt2-xl, EleutherAI/pythia-160m, "
        "facebook/opt-125m, HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B, ...), of an encoder-decoder (t5-small, "
        "google/flan-t5-base, bigscience/T0_3B, facebook/bart-base), or a local directory; --gpt2 is ClipCap's name "
        "for it",
        aliases=("gpt2",),
        group="ours",
        usage=("model",),
    )
    lora_r: int = option(
        0,
        "LoRA rank: train low-rank adapters on the LM's attention projections (and the mapper); the LM's own "
        "weights stay frozen and out of checkpoints (0: no LoRA)",
        minimum=0,
        group="ours",
        usage=("model", "fsdp"),
    )
    lora_alpha: float | None = option(
        None,
        "LoRA scale numerator: the adapters' update is scaled by alpha / r",
        positive=True,
        shown_default="2 x --lora_r (a scale of 2 whatever the rank)",
        group="ours",
        usage=("model", "lora"),
    )
    lora_dropout: float = option(
        0.05, "dropout on the adapters' input, in [0, 1)", minimum=0, group="ours", usage=("model", "lora")
    )
    lora_targets: list[str] | None = option(
        None,
        "the LM modules LoRA adapts, by name or name ending (q_proj v_proj, attn.c_attn)",
        shown_default="the family's attention projections (models/lm.py LORA_TARGETS)",
        group="ours",
        usage=("model", "lora"),
    )
    lm_dtype: str = option(
        "fp32",
        "dtype of the LM's weights, for a frozen (--only_prefix) or LoRA LM (the mapper and adapters stay fp32); "
        "a full fine-tune needs fp32 weights (mixed precision is --precision)",
        choices=list(LM_DTYPES),
        group="ours",
        usage=("model",),
    )
    gradient_checkpointing: bool = option(
        False,
        "recompute the LM's activations in the backward pass instead of storing them: less memory, about a "
        "third more compute",
        group="ours",
    )
    prompt: str | None = option(
        None,
        'an encoder-decoder LM (T5, BART): text its encoder reads after the prefix, e.g. "a picture of"; recorded '
        "in the model config, so decoding uses it too",
        group="ours",
        usage=("model", "prefix_mapper"),
    )
    noise_std: float = option(
        0.0,
        "CapDec's noise (text-only training): each training feature x becomes normalize(normalize(x) + e), e ~ "
        "N(0, std^2) per dimension (CapDec's variance 0.016: std 0.126); needs --normalize_prefix (0: none)",
        minimum=0,
        group="ours",
        usage=("prefix_mapper", "cross_entropy"),
    )
    lr: float = option(2e-5, "peak AdamW learning rate", positive=True, group="ours")
    warmup_steps: int | None = option(
        None,
        "warmup steps of the learning rate: linear, then linear decay to 0 (cross-entropy); under --scst and "
        "--unpaired a constant rate after them",
        minimum=0,
        shown_default="5000 for cross-entropy, as ClipCap; 0 under --scst and --unpaired",
        group="ours",
    )
    weight_decay: float = option(0.0, "AdamW weight decay (ClipCap: 0)", minimum=0, group="ours")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", minimum=0, group="ours")
    val_data: str | None = option(
        None,
        "validation features (.pkl or store directory): loss per caption token after each epoch, and "
        "{prefix}_best_loss.pt, the model of the lowest",
        group="ours",
    )
    eval_every: int = option(
        0,
        "every N epochs (and the last), greedy-decode --val_data, log CIDEr and BLEU-4, keep {prefix}_best.pt "
        "(0: off)",
        minimum=0,
        group="ours",
        usage=("fsdp",),
    )
    precision: str = option("auto", PRECISION_HELP, choices=["auto", *PRECISIONS], group="ours")
    device: str = option("auto", DEVICE_HELP, group="ours")
    num_workers: int = option(0, "DataLoader worker processes", minimum=0, group="ours")
    seed: int = option(0, "seed of the mapper's initial weights, the data order and dropout", group="ours")
    save_latest_every: int = option(
        10_000, "save {prefix}_latest.pt every N steps (and after every epoch)", minimum=1, group="ours"
    )
    resume: str | None = option(
        None, "continue from a {prefix}_latest.pt, or the directory holding it", metavar="PATH_OR_DIR", group="ours"
    )
    overwrite: bool = option(
        False,
        "start over even if --out_dir holds a run with this --prefix (its files are deleted)",
        group="ours",
    )
    cache_dir: str | None = option(
        None,
        "where tokenized captions are cached",
        shown_default="$CLIPCAP_PLUS_CACHE_DIR or ~/.cache/clipcap-plus",
        group="ours",
    )
    max_caption_chars: int = option(
        2000,
        "captions longer than this many characters are dropped (and counted) before tokenizing",
        minimum=1,
        group="ours",
    )
    fsdp: bool = option(
        False,
        "under torchrun (2 or more processes), shard the LM's blocks, the rest of the model, their gradients and "
        "AdamW's state over the processes (FSDP2), for LMs whose full fine-tune does not fit one GPU under DDP; "
        "checkpoints hold the whole weights as without it",
        group="ours",
    )
    export_hf: str | None = option(
        None,
        "after training, export the final epoch's checkpoint to this directory as export.py does (checked at "
        "start: a new directory, or an earlier export with --overwrite)",
        metavar="OUT_DIR",
        group="ours",
    )
    push_to_hub: str | None = option(
        None, "with --export_hf: then upload the export to this hub model repository", metavar="REPO_ID", group="ours"
    )
    scst: bool = option(
        False, "fine-tune --init_from by SCST instead of cross-entropy", group="scst", usage=("fsdp",)
    )
    init_from: str | None = option(
        None,
        "the train.py checkpoint (or export.py directory) to start from: its config decides the model",
        group="scst",
        usage=("sampling",),
    )
    reward: str | None = option(
        None,
        "--scst: cider (CIDEr-D), clip (CLIP-S) or cider+clip; --unpaired: clip (CgT-GAN's CLIP score against the "
        "image), clip_agg (against the image's CLIP-agg of the corpus), adv (the discriminator's) or clip_agg+adv",
        choices=list(dict.fromkeys([*REWARDS, *UNPAIRED_REWARDS])),
        shown_default="cider under --scst, clip_agg+adv under --unpaired",
        group="scst",
        usage=("sampling",),
    )
    baseline: str = option(
        "mean",
        "mean of the image's other samples, or its greedy caption's",
        choices=BASELINES,
        group="scst",
        usage=("scst",),
    )
    scst_samples: int = option(5, "captions sampled per image", minimum=1, group="scst", usage=("sampling",))
    max_length: int = option(20, "most tokens a sampled caption has", minimum=1, group="scst", usage=("sampling",))
    clip_model: str | None = option(
        None, "CLIP name, id or directory with both towers (clip rewards)", group="scst", usage=("sampling",)
    )
    clip_features: str | None = option(
        None,
        "parse_coco_clip.py features of --clip_model over --data's images, when --data holds other features",
        group="scst",
        usage=("sampling",),
    )
    clip_weight: float = option(1.0, "weight of CLIP-S in --reward cider+clip", group="scst", usage=("scst",))
    unpaired: bool = option(
        False,
        "fine-tune --init_from (a text-only model) on --data's images and the --corpus sentences, never paired: "
        "SCST's sampler, greedy baseline and loss, a CLIP reward and a discriminator's",
        group="unpaired",
        usage=("fsdp", "one_objective"),
    )
    corpus: str | None = option(
        None,
        "the sentence corpus: parse_corpus.py features (modality text) of --clip_model's text tower; its "
        "sentences are the discriminator's real text and the CLIP-agg target's memory",
        group="unpaired",
        usage=("unpaired",),
    )
    discriminator: str = option(
        "roberta-base",
        "the discriminator's text encoder: a transformers id or directory of any encoder and its tokenizer (an "
        "MLP head on its first token gives the logit)",
        metavar="ID_OR_DIR",
        group="unpaired",
        usage=("unpaired",),
    )
    reward_weight: float = option(
        0.5,
        "--reward clip_agg+adv: the CLIP reward's final weight lambda, in [0, 1] (the adversarial reward has 1 - lambda)",
        minimum=0,
        group="unpaired",
        usage=("unpaired",),
    )
    gan_steps: int = option(
        150, "--reward clip_agg+adv: steps of the adversarial reward alone (lambda 0)", minimum=0, group="unpaired",
        usage=("unpaired",),
    )  # fmt: skip
    gan_warm_steps: int = option(
        1000,
        "--reward clip_agg+adv: steps over which lambda then rises linearly to --reward_weight",
        minimum=0,
        group="unpaired",
        usage=("unpaired",),
    )
    disc_lr: float = option(1e-5, "the discriminator's AdamW learning rate", positive=True, group="unpaired", usage=("unpaired",))

    @property
    def objective(self) -> str:
        """What the run optimizes: its name in stages/objectives.py's registry."""
        return "unpaired" if self.unpaired else "scst" if self.scst else "cross_entropy"


def captioner_config(options: TrainingOptions, features: FeatureFile) -> CaptionerConfig:
    """The model config: architecture from the flags, feature width and encoder from the feature file."""
    if options.dino_feature_dim is not None and options.dino_feature_dim != features.feature_dim:
        raise InputError(
            f"--dino_feature_dim {options.dino_feature_dim}, but {options.data} holds {features.feature_dim}-d features"
        )
    encoder = features.meta.get("encoder")  # absent in ClipCap's own files
    family = encoder.get("family") if isinstance(encoder, dict) else None
    if (options.use_dino or options.dino_model_type) and family not in (None, "dinov2"):
        raise InputError(f"--use_dino, but {options.data} holds {family} features")
    if options.dino_model_type and isinstance(encoder, dict):
        expected = DINOV2_MODELS.get(options.dino_model_type, options.dino_model_type)
        if encoder.get("name") != expected:
            raise InputError(
                f"--dino_model_type {options.dino_model_type}, but {options.data} holds features of {encoder.get('name')}"
            )
    if options.mapping_type == "xattn" and features.token_count is None:
        raise InputError(
            f"--mapping_type xattn attends to patch tokens, but {options.data} holds one vector per image; "
            "extract with --feature_type patch_tokens"
        )
    if options.mapping_type != "xattn" and features.token_count is not None:
        raise InputError(
            f"--mapping_type {options.mapping_type} maps one vector per image, but {options.data} holds patch "
            "tokens; use --mapping_type xattn"
        )
    if not options.normalize_prefix and (options.noise_std or features.modality == TEXT_MODALITY):
        # Text and image embeddings of one CLIP differ in norm: only their directions carry over, so a captioner
        # trained on text sees normalized features (CapDec's noise is added to normalized features too).
        why = f"--noise_std {options.noise_std}" if options.noise_std else f"{options.data} holds text embeddings"
        raise InputError(f"{why}: give --normalize_prefix, so images' embeddings are normalized alike at inference")
    # A directory is recorded absolute, so the checkpoint loads from any working directory.
    lm_name = str(Path(options.lm).resolve()) if Path(options.lm).is_dir() else options.lm
    if options.lm_dtype != "fp32" and not (options.only_prefix or options.lora_r):
        # AdamW's updates are mostly far below a bf16 weight's resolution (8 bits of mantissa): they would
        # round away. Mixed precision (fp32 weights, bf16 compute) is --precision.
        raise InputError(
            f"--lm_dtype {options.lm_dtype} trains the LM's weights in {options.lm_dtype}, where most updates round "
            "away; fine-tune in fp32 weights (with --precision bf16 for speed), or freeze the LM: --only_prefix "
            "or --lora_r"
        )
    if options.lm_dtype != "fp32" and options.mapping_type == "xattn":
        raise InputError(
            f"--lm_dtype {options.lm_dtype}: xattn's new cross-attention layers would train in {options.lm_dtype} "
            "weights; use --lm_dtype fp32 (with --precision bf16 for speed)"
        )
    return CaptionerConfig(
        feature_dim=features.feature_dim,
        prefix_length=1 if options.mapping_type == "xattn" else options.prefix_length,  # xattn: the start embedding
        prefix_length_clip=options.prefix_length_clip,
        mapping_type=options.mapping_type,
        num_layers=options.num_layers,
        normalize_prefix=options.normalize_prefix,
        lm_name=lm_name,
        lm_in_checkpoint=not (options.only_prefix or options.lora_r),
        lm_dtype=options.lm_dtype,
        lora=lora_spec(options, lm_name) if options.lora_r else None,
        prompt=options.prompt,
        encoder=encoder,
    )


def lora_spec(options: TrainingOptions, lm_name: str) -> dict:
    """The config's LoRA spec from the flags, the targets resolved (the family's default unless given), so a
    checkpoint names the modules it adapts."""
    if options.only_prefix:
        raise InputError("--lora_r trains adapters in the LM, --only_prefix trains the mapper alone: give one")
    if options.lora_dropout >= 1:
        raise InputError(f"--lora_dropout {options.lora_dropout}: must be below 1")
    targets = options.lora_targets or lora_targets(pretrained_lm_config(lm_name).model_type, lm_name)
    alpha = options.lora_alpha if options.lora_alpha is not None else 2 * options.lora_r
    return {"r": options.lora_r, "alpha": alpha, "dropout": options.lora_dropout, "targets": targets}
