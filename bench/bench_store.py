"""Training start-up on the feature store against the pickle: time to the first training step and
peak RSS (ru_maxrss), with a tiny LM so that the data path dominates.

A generated data set of --rows images (--feature_dim, fp16 in the store; the same values in fp32 in
the pickle) with one short caption each; a store of --small_rows images beside it for the flat-RSS
comparison. Each measurement runs train.py's Trainer in a fresh process, stopped after its first step;
"cold" tokenizes the captions into the cache, "warm" reads them from it.

    python bench/bench_store.py                           # 1M rows: a few GB of disk in --work_dir
    python bench/bench_store.py --rows 100000 --small_rows 10000

`--merge_rows N` measures instead the end of a folder extraction into a store (`--output_format shards`):
rank 0 merging the chunk files of two ranks (2000 images each, interleaved indices, as torchrun leaves
them) of N ViT-B/32 token rows (50 x 768) into an fp16 store, in a fresh process each: the streaming
merge (stages/extract_merge.py) against the merge it replaced (`old_merge` below); peak RSS and seconds.

    python bench/bench_store.py --merge_rows 20000        # 3 GB of chunk files in --work_dir
"""

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/bench_store.py`

WORDS = "a an the red blue green small large dog cat man woman bike car tree street park on in near with two three".split()


def captions_of(start: int, count: int) -> list[str]:
    """Short captions (5 to 8 words), a pure function of the row."""
    rng = np.random.default_rng(start)
    lengths = rng.integers(5, 9, count)
    words = rng.integers(0, len(WORDS), (count, 8))
    return [" ".join(WORDS[w] for w in words[i, : lengths[i]]) for i in range(count)]


def generate(work_dir: Path, rows: int, feature_dim: int, with_pickle: bool) -> dict[str, Path]:
    """A store (fp16) of `rows` images, and (`with_pickle`) the same data as a pickle."""
    import torch

    from data.features import FeatureFile, write_feature_file
    from data.store import shard_name, write_shard, write_store_meta

    store = work_dir / f"store_{rows}"
    shutil.rmtree(store, ignore_errors=True)
    per_shard, shards, blocks, captions = 100_000, [], [], []
    for number, start in enumerate(range(0, rows, per_shard)):
        count = min(per_shard, rows - start)
        block = np.random.default_rng(number).standard_normal((count, feature_dim)).astype(np.float16)
        texts = captions_of(start, count)
        shards.append(write_shard(store, shard_name(number), block, [(start + i, t, i) for i, t in enumerate(texts)], "fp16"))
        if with_pickle:
            blocks.append(block)
            captions += [{"image_id": start + i, "caption": t, "clip_embedding": start + i} for i, t in enumerate(texts)]
    write_store_meta(store, {"encoder": {}}, shards, (feature_dim,), "fp16")
    paths = {"store": store}
    if with_pickle:
        paths["pickle"] = work_dir / f"features_{rows}.pkl"
        embeddings = torch.from_numpy(np.concatenate(blocks).astype(np.float32))
        write_feature_file(paths["pickle"], FeatureFile(embeddings, captions, {"feature_dim": feature_dim}))
    return paths


class FirstStep(Exception):
    """Raised after the first optimizer step, to end the measured run there."""


def measure(data: str, lm_dir: str, cache_dir: str, out_dir: str) -> None:
    """One run in this process: seconds to the end of the first step, and peak RSS; printed as JSON."""
    import train
    from stages.train import Trainer

    original = Trainer.train_step

    def first_step_only(self, batch, epoch):
        original(self, batch, epoch)
        raise FirstStep

    Trainer.train_step = first_step_only
    args = train.parse_args([
        "--data", data, "--out_dir", out_dir, "--gpt2", lm_dir, "--cache_dir", cache_dir, "--overwrite",
        "--prefix_length", "4", "--bs", "40", "--num_workers", "0", "--device", "cpu",
    ])  # fmt: skip
    start = time.perf_counter()
    try:
        train.main(args)
    except FirstStep:
        pass
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds_to_first_step": round(seconds, 2), "peak_rss_mb": round(peak_mb)}))


def run_measure(data: Path, lm_dir: Path, cache_dir: Path, work_dir: Path) -> dict:
    command = [sys.executable, __file__, "--measure", str(data), "--lm", str(lm_dir), "--cache_dir", str(cache_dir)]
    command += ["--work_dir", str(work_dir)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(completed.stderr[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


MERGE_TOKENS, MERGE_WIDTH, MERGE_RANKS, MERGE_CHUNK = 50, 768, 2, 2000  # ViT-B/32 tokens; the default chunk


def generate_chunks(partial_dir: Path, rows: int) -> None:
    """The partial store two ranks leave: rank r encodes images r, r + 2, ...; each saves a chunk per 2000."""
    import torch

    from stages.extract_resume import Chunk, PartialStore

    partial = PartialStore(str(partial_dir).removesuffix(".partial"), {"bench": rows})
    partial.start(fresh=True)
    generator = torch.Generator().manual_seed(0)
    for rank in range(MERGE_RANKS):
        mine = list(range(rank, rows, MERGE_RANKS))
        for start in range(0, len(mine), MERGE_CHUNK):
            chunk, indices = Chunk(), mine[start : start + MERGE_CHUNK]
            chunk.add(indices, torch.randn(len(indices), MERGE_TOKENS, MERGE_WIDTH, generator=generator), [])
            partial.save(chunk)


def old_merge(partial_dir: Path, output: Path) -> None:
    """The merge the streaming one replaced (stages/extract.py until 2026-12), its memory steps as they were:
    every chunk loaded whole, every row stacked into one tensor, the one shard (100,000 rows per shard then)
    cast to fp16 and serialized into a buffer, copied out and hashed, then written. (Captions left out: small.)"""
    import numpy as np
    import torch

    from data.atomic import atomic_write

    encoded = {}
    for path in sorted(partial_dir.glob("chunk-*.pt")):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        encoded.update(zip(payload["indices"], payload["features"], strict=True))
    embeddings = torch.stack([encoded[index] for index in sorted(encoded)])  # (N, T, D) float32
    array = np.ascontiguousarray(embeddings.float().contiguous().numpy(), dtype=np.float16)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    npy = buffer.getvalue()
    hashlib.sha256(npy).hexdigest()
    with atomic_write(output / "shard-00000.npy") as handle:
        handle.write(npy)


def measure_merge(way: str, partial_dir: Path, output: Path, rows: int) -> None:
    """One merge in this process: RSS before it, peak RSS, seconds; printed as JSON."""
    from data.annotations import ImageRecord
    from stages.extract_merge import merge_partial_results
    from stages.extract_resume import PartialStore

    records = [ImageRecord(index, f"{index}.jpg", [f"caption {index}"]) for index in range(rows)]
    before_mb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
    start = time.perf_counter()
    if way == "old":
        output.mkdir(parents=True, exist_ok=True)
        old_merge(partial_dir, output)
    else:
        partial = PartialStore(output, {"bench": rows})  # its directory: `output`.partial, links to the chunks
        paths = [output / record.file_path for record in records]
        merge_partial_results(records, paths, partial, output, {"encoder": {}}, "shards", "fp16")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shards = len(list(output.glob("shard-*.npy")))
    print(json.dumps({"rss_before_mb": round(before_mb), "peak_rss_mb": round(peak_mb), "seconds": round(seconds, 1), "shards": shards}))


def run_merges(rows: int, work_dir: Path) -> None:
    """Generate the chunks once; merge them the old way and the new way, each in a fresh process."""
    source = work_dir / f"chunks_{rows}.partial"
    began = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--merge_generate", str(rows), "--work_dir", str(work_dir)], check=True, cwd=REPO)
    data_gb = rows * MERGE_TOKENS * MERGE_WIDTH * 4 / 1e9
    print(f"{rows} rows of {MERGE_TOKENS} x {MERGE_WIDTH} tokens: {data_gb:.2f} GB float32 in chunk files, "
          f"{data_gb / 2:.2f} GB as fp16; generated in {time.perf_counter() - began:.0f} s", flush=True)  # fmt: skip
    results = {}
    for way in ("new", "old"):
        output = work_dir / f"merged_{way}"
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(f"{output}.partial", ignore_errors=True)
        # The new merge deletes its partial store when done: it gets hard links, the chunks stay for the next.
        shutil.copytree(source, f"{output}.partial", copy_function=os.link)
        command = [sys.executable, __file__, "--merge_measure", way, "--merge_rows", str(rows), "--work_dir", str(work_dir)]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if completed.returncode != 0:
            raise SystemExit(completed.stderr[-3000:])
        results[way] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"{way} merge: {results[way]}", flush=True)
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(f"{output}.partial", ignore_errors=True)
    print(json.dumps(results, indent=2))


def main() -> None:
    """Generate the data, then measure each configuration in its own process."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="images (one caption each) of the large set")
    parser.add_argument("--small_rows", type=int, default=10_000, help="images of the small store")
    parser.add_argument("--feature_dim", type=int, default=512, help="feature width")
    parser.add_argument("--work_dir", default="/tmp/bench_store", help="where the data, LM and cache go")
    parser.add_argument("--skip_pickle", action="store_true", help="measure the store only")
    parser.add_argument("--merge_rows", type=int, help="measure the merge of this many token rows into a store instead")
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--merge_generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--merge_measure", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--with_pickle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--lm", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    if args.merge_generate:
        generate_chunks(work_dir / f"chunks_{args.merge_generate}.partial", args.merge_generate)
        return
    if args.merge_measure:
        output = work_dir / f"merged_{args.merge_measure}"
        measure_merge(args.merge_measure, Path(f"{output}.partial"), output, args.merge_rows)
        return
    if args.merge_rows:
        work_dir.mkdir(parents=True, exist_ok=True)
        run_merges(args.merge_rows, work_dir)
        return
    if args.measure:
        measure(args.measure, args.lm, args.cache_dir, str(work_dir / "run"))
        return
    if args.generate:
        from models.tiny import save_tiny_gpt2

        save_tiny_gpt2(work_dir / "lm", [" ".join(WORDS)] * 4)
        generate(work_dir, args.generate, args.feature_dim, args.with_pickle)
        return
    # This process stays small (no torch): a child's ru_maxrss starts from its parent's size at fork.
    work_dir.mkdir(parents=True, exist_ok=True)
    lm_dir, cache_dir = work_dir / "lm", work_dir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    began = time.perf_counter()
    for rows, with_pickle in ((args.rows, not args.skip_pickle), (args.small_rows, False)):
        command = [sys.executable, __file__, "--generate", str(rows), "--feature_dim", str(args.feature_dim)]
        command += ["--work_dir", str(work_dir), *(["--with_pickle"] if with_pickle else [])]
        subprocess.run(command, check=True, cwd=REPO)
    large = {"store": work_dir / f"store_{args.rows}", "pickle": work_dir / f"features_{args.rows}.pkl"}
    if args.skip_pickle:
        del large["pickle"]
    small = {"store": work_dir / f"store_{args.small_rows}"}
    print(f"generated in {time.perf_counter() - began:.0f} s")
    results = {}
    for name, data in (
        (f"store {args.small_rows}", small["store"]),
        (f"store {args.rows}", large["store"]),
        *([(f"pickle {args.rows}", large["pickle"])] if "pickle" in large else []),
    ):
        for cache in ("cold", "warm"):
            results[f"{name} ({cache} caption cache)"] = figures = run_measure(data, lm_dir, cache_dir, work_dir)
            print(f"{name} ({cache} caption cache): {figures}", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
