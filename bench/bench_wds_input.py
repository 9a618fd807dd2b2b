"""Extraction input throughput: images/s from webdataset tar shards against the same JPEGs in a folder
(with a Karpathy file), through parse_coco_clip.py with a tiny CLIP tower, so that decoding and
preprocessing are what is measured. Both write a feature store.

    python bench/bench_wds_input.py --images 2000 --num_workers 2
"""

import argparse
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/bench_wds_input.py`

import parse_coco_clip  # noqa: E402
from models.tiny import save_tiny_clip  # noqa: E402


def make_images(work_dir: Path, count: int, per_shard: int) -> tuple[Path, str]:
    """`count` 640x480 JPEGs (COCO's usual size) as a folder + Karpathy file and as tar shards."""
    images, shards = work_dir / "images", work_dir / "shards"
    images.mkdir(parents=True)
    shards.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    entries, tar = [], None
    for index in range(count):
        if index % per_shard == 0:
            tar = tarfile.open(shards / f"{index // per_shard:05d}.tar", "w")
        pixels = np.roll(base, index * 7, axis=1)  # different images, same decoding cost
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        key, data = f"img{index:06d}", buffer.getvalue()
        (images / f"{key}.jpg").write_bytes(data)
        for name, member in ((f"{key}.jpg", data), (f"{key}.txt", b"a photo")):
            info = tarfile.TarInfo(name)
            info.size = len(member)
            tar.addfile(info, io.BytesIO(member))
        entries.append({"filename": f"{key}.jpg", "split": "train", "sentences": [{"raw": "a photo"}]})
        if index % per_shard == per_shard - 1 or index == count - 1:
            tar.close()
    (work_dir / "dataset.json").write_text(json.dumps({"images": entries}))
    return work_dir / "dataset.json", str(shards / f"{{00000..{(count - 1) // per_shard:05d}}}.tar")


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    parse_coco_clip.main(parse_coco_clip.parse_args(args))
    return time.perf_counter() - start


def main() -> None:
    """Generate the images once, then time each input format."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="number of images")
    parser.add_argument("--per_shard", type=int, default=100, help="images per tar shard")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader processes decoding images")
    parser.add_argument("--batch_size", type=int, default=64, help="images per encoder pass")
    parser.add_argument("--work_dir", default="/tmp/bench_wds_input", help="where the images and outputs go")
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    captions_file, pattern = make_images(work_dir, args.images, args.per_shard)
    clip = save_tiny_clip(work_dir / "clip")
    common = ["--clip_model_type", str(clip), "--device", "cpu", "--output_format", "shards"]
    common += ["--num_workers", str(args.num_workers), "--batch_size", str(args.batch_size)]
    folder = timed([*common, "--coco_images_dir", str(work_dir / "images"), "--captions_file", str(captions_file),
                    "--split", "train", "--output_file", str(work_dir / "out_folder")])  # fmt: skip
    shards = timed([*common, "--input_format", "webdataset", "--input", pattern,
                    "--output_file", str(work_dir / "out_shards")])  # fmt: skip
    workers = max(args.num_workers, 1)
    for name, seconds in (("folder + Karpathy JSON", folder), ("webdataset shards", shards)):
        rate = args.images / seconds
        print(f"{name}: {rate:.0f} images/s with {args.num_workers} workers ({rate / workers:.0f} per worker core)")


if __name__ == "__main__":
    main()
