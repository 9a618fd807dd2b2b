"""SCST speed: (1) the CIDEr-D reward against pycocoevalcap's Cider (its Java PTB tokenizer included)
on the same captions; (2) one SCST step (images x sampled captions, reward, one teacher-forced pass
with gradients) against one cross-entropy step over as many captions, on a real-size GPT-2 (random
weights; a random LM never emits EOS, so every sample runs to --max_length tokens).

Each step variant runs in a fresh process, so its peak memory is its own (peak RSS on CPU, peak
allocated on CUDA).

    python bench/bench_scst.py                        # CPU: a few minutes
    python bench/bench_scst.py --device cuda --images 256 --steps 5
"""

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, get_constant_schedule

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/bench_scst.py`

from bench.child import run_variant_process  # noqa: E402
from data.captions import CaptionCollator  # noqa: E402
from data.errors import exit_on_input_error  # noqa: E402
from data.features import FeatureFile  # noqa: E402
from models.captioner import ClipCaptionModel  # noqa: E402
from models.config import CaptionerConfig  # noqa: E402
from models.device import DEVICE_HELP, resolve_device, resolve_precision  # noqa: E402
from models.tiny import train_tokenizer  # noqa: E402
from stages.rewards import CiderD, normalize_caption  # noqa: E402
from stages.scst import RewardScorer, scst_loss  # noqa: E402
from stages.train import apply_gradients, compute_loss  # noqa: E402

SUBJECTS = "a man|a woman|two people|a dog|a cat|a group of children|a large bus|a red truck|an old bicycle".split("|")
ACTIONS = "sitting on|standing next to|riding|walking along|looking at|parked near|playing with".split("|")
PLACES = "a bench|the street|a wooden table|a green field|the beach|a city sidewalk|a kitchen counter".split("|")


def coco_like_caption(rng: random.Random) -> str:
    """A caption of COCO's shape and length (about 10 words, some punctuation)."""
    text = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
    if rng.random() < 0.4:
        text += f", {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
    return text.capitalize() + ("." if rng.random() < 0.7 else "")


def bench_reward(num_captions: int, seed: int) -> dict:
    """Captions/s of our CIDEr-D (normalization included) and of pycocoevalcap's (PTB tokenizer included)."""
    from pycocoevalcap.cider.cider import Cider

    from stages.evaluate import ptb_tokenize

    rng = random.Random(seed)
    references = {image: [coco_like_caption(rng) for _ in range(5)] for image in range(num_captions)}
    candidates = {image: coco_like_caption(rng) for image in references}
    start = time.perf_counter()
    scorer = CiderD({image: [normalize_caption(c) for c in refs] for image, refs in references.items()})
    setup = time.perf_counter() - start
    start = time.perf_counter()
    ours = scorer.scores(list(candidates), [normalize_caption(c) for c in candidates.values()])
    scoring = time.perf_counter() - start
    start = time.perf_counter()
    tokenized = ptb_tokenize({**{("ref", i): r for i, r in references.items()}, **{("res", i): [c] for i, c in candidates.items()}})
    gts = {i: tokenized[("ref", i)] for i in references}
    res = {i: tokenized[("res", i)] for i in references}
    _, theirs = Cider().compute_score(gts, res)
    toolkit = time.perf_counter() - start
    return {
        "captions": num_captions,
        "ours_captions_per_s": num_captions / scoring,
        "ours_reference_setup_s": setup,
        "toolkit_captions_per_s": num_captions / toolkit,
        "mean_cider_ours": sum(ours) / len(ours),
        "mean_cider_toolkit": float(theirs.mean()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--reward_captions", type=int, default=5000, help="captions scored by both CIDEr-Ds")
    parser.add_argument("--images", type=int, default=40, help="images per step")
    parser.add_argument("--samples", type=int, default=5, help="SCST samples (and CE captions) per image")
    parser.add_argument("--max_length", type=int, default=20, help="tokens per sampled caption")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--only_prefix", action="store_true", help="freeze GPT-2 (mapper only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, features and captions")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one step kind, in a child
    return parser.parse_args(argv)


def run_variant(args: argparse.Namespace) -> dict:
    """Time one kind of step (scst or ce) in this process."""
    device = resolve_device(args.device)
    precision = resolve_precision(None, device)
    torch.manual_seed(args.seed)
    lm = GPT2LMHeadModel(GPT2Config())
    config = CaptionerConfig(feature_dim=512, prefix_length=10, lm_name="gpt2", lm_in_checkpoint=not args.only_prefix)
    model = ClipCaptionModel(config, lm).to(device).train()
    if args.only_prefix:
        model.freeze_lm()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, eps=1e-6)
    scheduler = get_constant_schedule(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    rng = random.Random(args.seed)
    texts = [coco_like_caption(rng) for _ in range(args.images * 5)]
    # GPT-2's byte-level BPE, trained here on the captions (no download); the LM's vocabulary is GPT-2's.
    tokenizer: GPT2TokenizerFast = train_tokenizer(texts, vocab_size=1000)
    tokenizer.pad_token = tokenizer.eos_token  # as models.checkpoint.load_tokenizer sets it
    features = FeatureFile(
        torch.randn(args.images, 512),
        [{"image_id": row, "caption": text, "clip_embedding": row} for row, text in enumerate(texts) if row < args.images],
    )
    if args.variant == "scst":
        scorer = RewardScorer("cider", features, "bench")

        def step() -> None:
            batch = features.embeddings.to(device)
            loss, _ = scst_loss(
                model, model, tokenizer, batch, list(range(args.images)), scorer,
                num_samples=args.samples, max_length=args.max_length, baseline="mean", precision=precision,
            )  # fmt: skip
            apply_gradients(loss, trainable, optimizer, scheduler, scaler, 1.0)
    else:
        collate = CaptionCollator(tokenizer.eos_token_id)
        captions = args.images * args.samples
        items = [(torch.randn(512), torch.randint(1, 50257, (args.max_length,))) for _ in range(captions)]
        batch = collate(items).to(device)

        def step() -> None:
            apply_gradients(compute_loss(model, batch, device, precision), trainable, optimizer, scheduler, scaler, 1.0)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"variant": args.variant, "seconds_per_step": seconds, "peak_mib": peak_mib, "precision": precision}


def main(args: argparse.Namespace) -> None:
    """The reward comparison, then each step kind in its own process; prints a table of each."""
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    print(json.dumps({key: value for key, value in vars(args).items() if key != "variant"}), flush=True)
    reward = bench_reward(args.reward_captions, args.seed)
    print(
        f"CIDEr-D reward, {reward['captions']} captions x 5 references: ours {reward['ours_captions_per_s']:.0f} "
        f"captions/s (references prepared once in {reward['ours_reference_setup_s']:.2f} s), pycocoevalcap with "
        f"its tokenizer {reward['toolkit_captions_per_s']:.0f} captions/s: "
        f"{reward['ours_captions_per_s'] / reward['toolkit_captions_per_s']:.0f}x; mean CIDEr-D "
        f"{reward['mean_cider_ours']:.4f} vs {reward['mean_cider_toolkit']:.4f}",
        flush=True,
    )
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    mode = "mapper only" if args.only_prefix else "mapper + GPT-2"
    print(f"device: {name}; GPT-2 124M ({mode}); {args.images} images x {args.samples}, {args.max_length} tokens")
    print(f"{'step':<34}{'s/step':>9}{'peak MiB':>10}")
    figures = {}
    for variant, label in (("ce", "cross-entropy (captions)"), ("scst", "SCST (sample, reward, pass)")):
        result, error = run_variant_process(__file__, variant)
        if result is None:
            print(f"{label:<34} failed: {error}")
            continue
        figures[variant] = result
        print(f"{label:<34}{figures[variant]['seconds_per_step']:>9.2f}{figures[variant]['peak_mib']:>10.0f}", flush=True)
    if len(figures) == 2:
        print(f"SCST step / cross-entropy step: {figures['scst']['seconds_per_step'] / figures['ce']['seconds_per_step']:.2f}x")


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
