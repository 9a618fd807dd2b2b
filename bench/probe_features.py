r"""Linear-probe accuracy per attribute of the synthetic set: how much of each attribute (shape, count,
color, size, background) a feature file's image embeddings hold, read off by a logistic regression.

    python bench/probe_features.py demo_output/features/train.pkl --dataset demo_output/synthetic/dataset_synthetic.json

The file's images are split 80/20 (by a seeded permutation); the probe trains on the first part and
prints held-out accuracy next to chance. Features are standardized first."""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.errors import InputError, exit_on_input_error, read_json_input  # noqa: E402
from data.features import read_feature_file  # noqa: E402
from data.synthetic import chance_levels  # noqa: E402

ATTRIBUTES = ("shape", "count", "color", "size", "background")


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS, light L2) trained on rows `train`."""
    classes = int(labels.max()) + 1
    test = ~train
    mean, std = features[train].mean(0), features[train].std(0).clamp(min=1e-6)
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x[train] @ weight + bias, labels[train]) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((x[test] @ weight + bias).argmax(1) == labels[test]).float().mean())


def probe(features_file: str, dataset: str, seed: int = 0) -> dict[str, float]:
    """Attribute -> held-out probe accuracy for the images of `features_file` (scenes from `dataset`)."""
    feature_file = read_feature_file(features_file)
    scenes = {image["cocoid"]: image["scene"] for image in read_json_input(dataset, "dataset file")["images"]}
    rows = feature_file.image_rows()  # image id -> row
    missing = [image_id for image_id in rows if image_id not in scenes]
    if missing:
        raise InputError(f"{features_file}: image id {missing[0]} has no scene in {dataset} (a synthetic dataset file)")
    ids = sorted(rows, key=rows.get)
    if len(ids) < 10:
        raise InputError(f"{features_file}: {len(ids)} images; a probe needs at least 10")
    features = feature_file.embeddings[[rows[image_id] for image_id in ids]].float()
    generator = torch.Generator().manual_seed(seed)
    train = torch.zeros(len(ids), dtype=torch.bool)
    train[torch.randperm(len(ids), generator=generator)[: int(0.8 * len(ids))]] = True
    accuracy = {}
    for attribute in ATTRIBUTES:
        values = [scenes[image_id][attribute] for image_id in ids]
        vocabulary = {value: number for number, value in enumerate(sorted(set(values), key=str))}
        labels = torch.tensor([vocabulary[value] for value in values])
        accuracy[attribute] = probe_accuracy(features, labels, train)
    return accuracy


def main() -> None:
    """Print the probe table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features", help="a feature file of synthetic images (parse_coco_clip.py output)")
    parser.add_argument("--dataset", required=True, help="the synthetic set's dataset_synthetic.json (its scenes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split")
    args = parser.parse_args()
    accuracy = probe(args.features, args.dataset, args.seed)
    chance = chance_levels()
    print(f"{'attribute':<10} {'probe':>6} {'chance':>7}   ({args.features})")
    for attribute, value in accuracy.items():
        print(f"{attribute:<10} {value:6.0%} {chance[attribute]:7.0%}")


if __name__ == "__main__":
    with exit_on_input_error():
        main()
