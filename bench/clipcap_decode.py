"""ClipCap's own decoders, re-implemented faithfully as the baseline of bench_decode.py and the
reference of tests/test_decoding.py: `generate_beam` and `generate2` of ClipCap's predict.py /
notebooks, one image at a time, no key/value cache (the whole sequence goes through the LM at every
step, logits for every position), stopping only at `stop_token`.

Kept as ClipCap wrote them, quirks included: generate2's "nucleus" filter is followed by an argmax,
so it is greedy decoding and its temperature changes nothing; generate_beam divides by the
temperature and ranks beams by length-normalized score at every step. Do not use them for captioning.
"""

import numpy as np
import torch
import torch.nn.functional as nnf
from transformers import PreTrainedTokenizerBase

from models.captioner import ClipCaptionModel


def generate_beam(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerBase,
    beam_size: int = 5,
    embed: torch.Tensor | None = None,
    entry_length: int = 67,
    temperature: float = 1.0,
    stop_token: str = ".",
) -> list[str]:
    """ClipCap's beam search for one prefix `embed` (1, P, E): all beam texts, best first."""
    model.eval()
    stop_token_index = tokenizer.encode(stop_token)[0]
    tokens = None
    scores = None
    device = next(model.parameters()).device
    seq_lengths = torch.ones(beam_size, device=device)
    is_stopped = torch.zeros(beam_size, device=device, dtype=torch.bool)
    with torch.no_grad():
        generated = embed
        for _ in range(entry_length):
            outputs = model.gpt(inputs_embeds=generated)
            logits = outputs.logits
            logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
            logits = logits.softmax(-1).log()
            if scores is None:
                scores, next_tokens = logits.topk(beam_size, -1)
                generated = generated.expand(beam_size, *generated.shape[1:])
                next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
                tokens = next_tokens
            else:
                logits[is_stopped] = -float(np.inf)
                logits[is_stopped, 0] = 0
                scores_sum = scores[:, None] + logits
                seq_lengths[~is_stopped] += 1
                scores_sum_average = scores_sum / seq_lengths[:, None]
                scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
                next_tokens_source = next_tokens // scores_sum.shape[1]
                seq_lengths = seq_lengths[next_tokens_source]
                next_tokens = next_tokens % scores_sum.shape[1]
                next_tokens = next_tokens.unsqueeze(1)
                tokens = tokens[next_tokens_source]
                tokens = torch.cat((tokens, next_tokens), dim=1)
                generated = generated[next_tokens_source]
                scores = scores_sum_average * seq_lengths
                is_stopped = is_stopped[next_tokens_source]
            next_token_embed = model.gpt.transformer.wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
            generated = torch.cat((generated, next_token_embed), dim=1)
            is_stopped = is_stopped + next_tokens.eq(stop_token_index).squeeze()
            if is_stopped.all():
                break
    scores = scores / seq_lengths
    output_list = tokens.cpu().numpy()
    output_texts = [tokenizer.decode(output[: int(length)]) for output, length in zip(output_list, seq_lengths)]
    order = scores.argsort(descending=True)
    return [output_texts[i] for i in order]


def generate2(
    model: ClipCaptionModel,
    tokenizer: PreTrainedTokenizerBase,
    embed: torch.Tensor,
    entry_length: int = 67,
    top_p: float = 0.8,
    temperature: float = 1.0,
    stop_token: str = ".",
) -> str:
    """ClipCap's default decoder for one prefix `embed` (1, P, E): nucleus filtering, then argmax."""
    model.eval()
    tokens = None
    stop_token_index = tokenizer.encode(stop_token)[0]
    filter_value = -float("Inf")
    with torch.no_grad():
        generated = embed
        for _ in range(entry_length):
            outputs = model.gpt(inputs_embeds=generated)
            logits = outputs.logits
            logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
            sorted_logits, sorted_indices = torch.sort(logits, descending=True)
            cumulative_probs = torch.cumsum(nnf.softmax(sorted_logits, dim=-1), dim=-1)
            sorted_indices_to_remove = cumulative_probs > top_p
            sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
            sorted_indices_to_remove[..., 0] = 0
            indices_to_remove = sorted_indices[sorted_indices_to_remove]
            logits[:, indices_to_remove] = filter_value
            next_token = torch.argmax(logits, -1).unsqueeze(0)
            next_token_embed = model.gpt.transformer.wte(next_token)
            tokens = next_token if tokens is None else torch.cat((tokens, next_token), dim=1)
            generated = torch.cat((generated, next_token_embed), dim=1)
            if stop_token_index == next_token.item():
                break
        output_list = list(tokens.squeeze(0).cpu().numpy())
    return tokenizer.decode(output_list)
