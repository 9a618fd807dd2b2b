"""DeCap's projection at inference: an image embedding v becomes a mixture of a corpus's text embeddings,
v' = sum_j softmax_j(tau * v.s_j) s_j over the normalized corpus rows s_j (v normalized too), so a captioner
trained on text embeddings sees one (Li et al. 2023, "DeCap: Decoding CLIP latents for zero-shot captioning")."""

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F

from data.errors import InputError

MEMORY_TEMPERATURE = 100.0  # DeCap's tau
MEMORY_CHUNK_ROWS = 65_536  # corpus rows per pass: (B, chunk) similarities, never (B, N)


class TextMemory:
    """A corpus's text embeddings (N, D): a tensor or a store's memory-mapped rows (read a chunk at a time)."""

    def __init__(self, embeddings: Any, temperature: float = MEMORY_TEMPERATURE, chunk_rows: int = MEMORY_CHUNK_ROWS):
        self.embeddings, self.temperature, self.chunk_rows = embeddings, temperature, chunk_rows

    def __len__(self) -> int:
        return len(self.embeddings)

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) image features -> (B, D) mixtures of the memory's rows, float32 on the features' device.
        The softmax runs online over chunks of the corpus (running maximum, rescaled sums): exact, and bounded
        in memory whatever the corpus's size."""
        queries = F.normalize(features.float(), dim=-1)  # (B, D)
        batch = queries.shape[0]
        maximum = torch.full((batch, 1), -torch.inf, device=queries.device)  # (B, 1)
        weights = torch.zeros(batch, 1, device=queries.device)  # (B, 1): sum of exp(logit - maximum)
        mixture = torch.zeros_like(queries)  # (B, D): sum of exp(logit - maximum) * s_j
        for start in range(0, len(self.embeddings), self.chunk_rows):
            rows = torch.as_tensor(self.embeddings[start : start + self.chunk_rows]).to(queries.device)
            rows = F.normalize(rows.float(), dim=-1)  # (c, D)
            logits = self.temperature * queries @ rows.T  # (B, c)
            new_maximum = torch.maximum(maximum, logits.max(dim=1, keepdim=True).values)
            rescale = torch.exp(maximum - new_maximum)  # (B, 1): the earlier sums at the new maximum
            exponents = torch.exp(logits - new_maximum)  # (B, c)
            weights = weights * rescale + exponents.sum(dim=1, keepdim=True)
            mixture = mixture * rescale + exponents @ rows
            maximum = new_maximum
        return mixture / weights


def add_text_memory_args(parser: argparse.ArgumentParser) -> None:
    """predict.py's and evaluate.py's DeCap flags."""
    group = parser.add_argument_group("DeCap's text memory (a captioner trained on text embeddings)")
    group.add_argument(
        "--text_memory",
        metavar="CORPUS_FEATURES",
        help="parse_corpus.py features of the checkpoint's CLIP: each image embedding is projected onto them "
        "before captioning (a softmax-weighted mixture of the corpus's normalized text embeddings)",
    )
    group.add_argument(
        "--memory_temperature",
        type=float,
        default=None,  # None: refused without --text_memory, not silently ignored
        help=f"tau of the projection's softmax over cosine similarities (default: {MEMORY_TEMPERATURE:g}, DeCap's)",
    )


def memory_temperature(args: argparse.Namespace) -> float:
    """--memory_temperature, checked (positive, finite, and given only with --text_memory)."""
    if args.memory_temperature is None:
        return MEMORY_TEMPERATURE
    if not args.text_memory:
        raise InputError("--memory_temperature is the --text_memory projection's: give --text_memory too")
    if not math.isfinite(args.memory_temperature) or args.memory_temperature <= 0:
        raise InputError(f"--memory_temperature {args.memory_temperature}: must be above 0 and finite")
    return args.memory_temperature
