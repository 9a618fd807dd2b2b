"""Contrastive image-text training (Stage 0): an image encoder and a CLIP text side in one module with a
learnable temperature, the symmetric InfoNCE loss (CLIP's) over one process's batch or over every torchrun
process's batch together, and retrieval Recall@K to measure it."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INITIAL_TEMPERATURE = 0.07  # CLIP's: the logit scale starts at 1 / 0.07
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: a larger scale makes the loss unstable
RECALL_KS = (1, 5, 10)


def info_nce_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of B matching pairs (row i of each): the mean of the image->text and text->image
    cross-entropies over scaled cosine similarities. Embeddings (B, D), not necessarily normalized."""
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale * image_embeds @ text_embeds.T  # (B, B): image i against every text
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class AllGather(torch.autograd.Function):
    """all_gather of (b, D) rows, the same b on every process, into (W * b, D) in rank order. Backward
    sums the gradient over the processes (each one's loss reaches every row) and keeps this one's rows.
    (torch.distributed.nn's all_gather does this too, but is deprecated for a private API.)"""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()  # all_reduce works in place; autograd's gradient is not ours to change
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_batches(rows: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
    """(sum(batch_sizes), D): every torchrun process's rows in rank order, rank r holding batch_sizes[r]
    of them; the gradient of each row flows back to the process that computed it (a collective)."""
    longest = max(batch_sizes)
    padded = F.pad(rows, (0, 0, 0, longest - rows.shape[0]))  # all_gather needs one shape on every rank
    parts = AllGather.apply(padded).split(longest)
    return torch.cat([part[:size] for part, size in zip(parts, batch_sizes)])


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """(K,) the position of each distinct value's first occurrence in `ids` (N,), in order."""
    first: dict[int, int] = {}
    for position, value in enumerate(ids.tolist()):
        first.setdefault(value, position)
    return torch.tensor(list(first.values()), device=ids.device)


@dataclass
class ContrastiveOutput:
    """What a contrastive step returns: the loss and the temperature it used."""

    loss: torch.Tensor
    logit_scale: torch.Tensor


class ContrastivePair(nn.Module):
    """An image encoder, an optional trainable text encoder (a module mapping tokenizer outputs to
    embeddings; None when the text side is frozen and its embeddings come cached) and the logit scale."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))

    def logit_scale(self) -> torch.Tensor:
        """exp of the learned parameter, unclamped: a clamp here would have no gradient past the bound, and
        a scale that crossed it would stay there. clamp_logit_scale bounds it after each step instead."""
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Put the temperature back within MAX_LOGIT_SCALE, in place: CLIP's, after each optimizer step."""
        self.log_logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    def forward(
        self,
        pixels: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_inputs: dict | None = None,
        batch_sizes: list[int] | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """The loss of a batch of (image, caption) pairs: the caption's embedding given, or its tokens. With
        `batch_sizes` (every torchrun process's number of pairs, this one's included), the loss of them all,
        each image of `image_ids` (B,) counted once."""
        image_embeds = self.image_encoder(pixels)  # (B, D)
        if text_embeds is None:
            text_embeds = self.text_encoder(**text_inputs)  # (B, D), with gradients into the text tower
        if batch_sizes is not None:
            # Every process's pairs are negatives of every other's (CLIP's global batch). Each process
            # computes the same loss; all_gather's backward sums the processes' gradients into each one's
            # own rows and DDP averages the weights' gradients, so a step equals one process's on the whole.
            pairs = gather_batches(torch.cat((image_embeds.float(), text_embeds.float()), dim=1), batch_sizes)
            image_embeds, text_embeds = pairs.split([image_embeds.shape[1], text_embeds.shape[1]], dim=1)
            # DistributedSampler pads an epoch that does not share evenly with images repeated from its
            # start; when they meet in one step, the copy (the same caption too) is the image's own
            # negative. Keeping the first leaves the step one process's on the distinct images.
            keep = first_occurrences(gather_batches(image_ids[:, None], batch_sizes)[:, 0])
            image_embeds, text_embeds = image_embeds[keep], text_embeds[keep]
        scale = self.logit_scale()
        return ContrastiveOutput(info_nce_loss(image_embeds, text_embeds, scale), scale.detach())


def _hits(ranks: torch.Tensor) -> dict[int, float]:
    return {k: float((ranks < k).float().mean()) for k in RECALL_KS}


@torch.no_grad()
def retrieval_recall(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: torch.Tensor, chunk: int = 1024
) -> dict[str, float]:
    """Recall@1/5/10 both ways, in percent. image_embeds (N, D); text_embeds (M, D); text_image (M,) the
    image row of each caption (several captions per image). Image->text: an image hits at K when one of
    its captions ranks in the top K; text->image: a caption hits when its own image does. Ties count
    against: a match ranks behind every non-match scoring the same (a constant encoder scores 0, not 100)."""
    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    text_image = text_image.long()
    num_images = images.shape[0]
    image_ranks = []
    for start in range(0, num_images, chunk):  # (n, M) blocks: COCO's 5k x 25k matrix would be 500 MB
        similarity = images[start : start + chunk] @ texts.T
        rows = torch.arange(start, start + similarity.shape[0])
        positive = text_image[None, :] == rows[:, None]  # (n, M)
        best_match = similarity.masked_fill(~positive, -math.inf).max(dim=1).values  # (n,)
        image_ranks.append(((similarity >= best_match[:, None]) & ~positive).sum(dim=1))
    text_ranks = []
    for start in range(0, texts.shape[0], chunk):
        similarity = texts[start : start + chunk] @ images.T  # (m, N)
        own = text_image[start : start + chunk]
        own_score = similarity.gather(1, own[:, None])  # (m, 1)
        others = torch.ones_like(similarity, dtype=torch.bool).scatter_(1, own[:, None], False)
        text_ranks.append(((similarity >= own_score) & others).sum(dim=1))
    recall = {f"i2t_R@{k}": 100 * value for k, value in _hits(torch.cat(image_ranks)).items()}
    recall |= {f"t2i_R@{k}": 100 * value for k, value in _hits(torch.cat(text_ranks)).items()}
    recall["R@sum"] = sum(recall.values())
    return recall
