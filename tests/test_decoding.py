"""Decoding: cached equals recomputed, batched equals one by one, beam search as ClipCap's, stop
rules, and sampling that samples. A tiny GPT-2 whose EOS is made likely ends captions at varied lengths."""

import argparse
import collections

import pytest
import torch

from bench.clipcap_decode import generate2, generate_beam
from data.errors import InputError
from models.captioner import Conditioning
from models.checkpoint import build_captioner
from models.config import CaptionerConfig
from models.decoding import (
    DecodingOptions,
    add_decoding_args,
    caption_features,
    caption_text,
    decode,
    decoding_options_from_args,
    filter_logits,
    stop_token_ids,
)
from models.lm import load_lm, load_tokenizer

FEATURE_DIM = 16
NUM_IMAGES = 6
MAX_LENGTH = 24
EOS_EMBEDDING_SCALE = 5.0  # a larger EOS embedding makes EOS the argmax in some contexts, not in others
NUM_TOKENS = 5  # patch tokens per image for xattn
# xattn: fresh cross-attention layers barely move the logits; made strong, captions differ by image
# (scales found by search, as the EOS one: they give stops at several lengths)
CROSS_ATTENTION_SCALE = 15.0
XATTN_EOS_EMBEDDING_SCALE = 8.0


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    return load_tokenizer(str(tiny_gpt2_dir))


@pytest.fixture(scope="module", params=["mlp", "xattn"])
def captioner(request, tiny_gpt2_dir, tokenizer):
    cross_attention = request.param == "xattn"
    torch.manual_seed(0)
    config = CaptionerConfig(
        feature_dim=FEATURE_DIM,
        prefix_length=1 if cross_attention else 4,
        mapping_type=request.param,
        lm_name=str(tiny_gpt2_dir),
    )
    captioner = build_captioner(config, load_lm(str(tiny_gpt2_dir), cross_attention=cross_attention)).eval()
    with torch.no_grad():  # after building: xattn's start embedding copies BOS (here EOS), unscaled
        eos_scale = XATTN_EOS_EMBEDDING_SCALE if cross_attention else EOS_EMBEDDING_SCALE
        captioner.gpt.get_input_embeddings().weight[tokenizer.eos_token_id] *= eos_scale
        for block in captioner.gpt.transformer.h if cross_attention else ():
            block.crossattention.c_proj.weight *= CROSS_ATTENTION_SCALE
    return captioner


@pytest.fixture(scope="module")
def features(captioner):
    # xattn captions patch tokens (B, T, D); the prefix mappers one vector per image (B, D).
    shape = (NUM_IMAGES, NUM_TOKENS, FEATURE_DIM) if captioner.config.cross_attention else (NUM_IMAGES, FEATURE_DIM)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def prefix(captioner, features):
    with torch.no_grad():
        return captioner.condition(features)


def images(conditioning, start, stop):
    """The conditioning of images start..stop-1 alone."""
    states = conditioning.cross_states
    return Conditioning(conditioning.prefix[start:stop], states[start:stop] if states is not None else None)


def run(captioner, prefix, tokenizer, **options):
    options.setdefault("max_length", MAX_LENGTH)
    return decode(captioner, prefix, tokenizer.eos_token_id, DecodingOptions(**options))


def token_lists(hypotheses):
    return [[hypothesis.tokens for hypothesis in group] for group in hypotheses]


def test_fixture_ends_captions_at_varied_lengths(captioner, prefix, tokenizer):
    # The equalities below only test the stop logic if some captions stop early and some do not.
    lengths = {len(group[0].tokens) for group in run(captioner, prefix, tokenizer, method="greedy")}
    beam_lengths = {len(h.tokens) for group in run(captioner, prefix, tokenizer, num_captions=5) for h in group}
    assert len(lengths) > 1 and min(lengths) < MAX_LENGTH
    assert len(beam_lengths) > 2 and MAX_LENGTH in beam_lengths
    assert len({tuple(group[0].tokens) for group in run(captioner, prefix, tokenizer, method="greedy")}) > 1


@pytest.mark.parametrize("options", [{"method": "greedy"}, {"method": "beam", "num_captions": 5}, {"beam_size": 3}])
def test_cached_equals_full_recomputation(captioner, prefix, tokenizer, options):
    cached = run(captioner, prefix, tokenizer, **options)
    recomputed = run(captioner, prefix, tokenizer, use_cache=False, **options)
    assert token_lists(cached) == token_lists(recomputed)
    for cached_group, recomputed_group in zip(cached, recomputed):
        for a, b in zip(cached_group, recomputed_group):
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)


@pytest.mark.parametrize("options", [{"method": "greedy"}, {"method": "beam", "num_captions": 5}])
def test_batched_equals_one_by_one(captioner, prefix, tokenizer, options):
    batched = run(captioner, prefix, tokenizer, **options)
    one_by_one = [run(captioner, images(prefix, i, i + 1), tokenizer, **options)[0] for i in range(NUM_IMAGES)]
    assert token_lists(batched) == token_lists(one_by_one)


def test_beam_size_one_equals_greedy(captioner, prefix, tokenizer):
    greedy = run(captioner, prefix, tokenizer, method="greedy")
    beam = run(captioner, prefix, tokenizer, method="beam", beam_size=1)
    assert token_lists(beam) == token_lists(greedy)
    assert [group[0].log_prob for group in beam] == pytest.approx([group[0].log_prob for group in greedy])


def test_best_beam_scores_at_least_greedy(captioner, prefix, tokenizer):
    greedy = run(captioner, prefix, tokenizer, method="greedy")
    beam = run(captioner, prefix, tokenizer, method="beam", beam_size=5)
    # Beam sums log-probabilities in float32, greedy in float64: allow for rounding.
    for greedy_group, beam_group in zip(greedy, beam):
        assert beam_group[0].score >= greedy_group[0].score - 1e-5
    # Fixed-length search (no stop) ranks by log-probability alone: compare those too.
    never = -1  # an id no token has, so nothing stops before max_length
    greedy = decode(captioner, prefix, never, DecodingOptions(method="greedy", max_length=8))
    beam = decode(captioner, prefix, never, DecodingOptions(method="beam", max_length=8))
    for greedy_group, beam_group in zip(greedy, beam):
        assert beam_group[0].log_prob >= greedy_group[0].log_prob - 1e-5


def test_beam_returns_num_captions_distinct_best_first(captioner, prefix, tokenizer):
    for group in run(captioner, prefix, tokenizer, beam_size=4, num_captions=3):
        assert len(group) == 3
        assert len({tuple(h.tokens) for h in group}) == 3
        scores = [h.score for h in group]
        assert scores == sorted(scores, reverse=True)
        for h in group:
            assert h.score == pytest.approx(h.log_prob / len(h.tokens))


@pytest.mark.parametrize("captioner", ["mlp"], indirect=True)  # ClipCap's search continues a prefix
def test_beam_equals_clipcap_generate_beam(captioner, prefix, tokenizer):
    # ClipCap stops at its stop token only; with EOS as that token both searches are the same.
    ours = run(captioner, prefix, tokenizer, beam_size=5, num_captions=5)
    for image in range(NUM_IMAGES):
        theirs = generate_beam(
            captioner, tokenizer, 5, prefix.prefix[image : image + 1], MAX_LENGTH, stop_token=tokenizer.eos_token
        )
        assert theirs == [tokenizer.decode(h.tokens) for h in ours[image]]


@pytest.mark.parametrize("captioner", ["mlp"], indirect=True)  # ClipCap's search continues a prefix
def test_greedy_equals_clipcap_generate2(captioner, prefix, tokenizer):
    ours = run(captioner, prefix, tokenizer, method="greedy")
    for image in range(NUM_IMAGES):
        theirs = generate2(
            captioner, tokenizer, prefix.prefix[image : image + 1], MAX_LENGTH, stop_token=tokenizer.eos_token
        )
        assert theirs == tokenizer.decode(ours[image][0].tokens)


def test_stops_at_eos_and_at_stop_token(captioner, prefix, tokenizer):
    never = -1
    free = decode(captioner, prefix, never, DecodingOptions(method="greedy", max_length=10))
    assert all(len(group[0].tokens) == 10 for group in free)
    first = free[0][0].tokens
    # Whichever token comes third, making it the EOS (or a stop token) ends the caption there.
    ending = first[2]
    ends_at = first.index(ending) + 1
    as_eos = decode(captioner, images(prefix, 0, 1), ending, DecodingOptions(method="greedy", max_length=10))
    as_stop = decode(captioner, images(prefix, 0, 1), never, DecodingOptions(method="greedy", max_length=10), (ending,))
    assert as_eos[0][0].tokens == first[:ends_at]
    assert as_stop[0][0].tokens == first[:ends_at]


def test_stop_token_text_is_kept_and_eos_dropped(tokenizer):
    period = stop_token_ids(tokenizer, ".")
    assert len(period) == 1
    words = tokenizer.encode("a dog", add_special_tokens=False)
    assert caption_text(tokenizer, [*words, *period]) == "a dog."
    assert caption_text(tokenizer, [*words, tokenizer.eos_token_id]) == "a dog"
    with pytest.raises(InputError, match="stop_token"):
        stop_token_ids(tokenizer, "a dog sitting")
    assert stop_token_ids(tokenizer, None) == stop_token_ids(tokenizer, "") == ()  # "": EOS only


def test_max_length_bounds_every_method(captioner, prefix, tokenizer):
    for method in ("greedy", "beam", "sample"):
        groups = run(captioner, prefix, tokenizer, method=method, max_length=5, seed=0)
        assert max(len(h.tokens) for group in groups for h in group) == 5


def test_sampling_is_reproducible_and_really_samples(captioner, prefix, tokenizer):
    first = run(captioner, prefix, tokenizer, method="sample", seed=3, num_captions=2)
    again = run(captioner, prefix, tokenizer, method="sample", seed=3, num_captions=2)
    other = run(captioner, prefix, tokenizer, method="sample", seed=4, num_captions=2)
    greedy = run(captioner, prefix, tokenizer, method="greedy")
    assert token_lists(first) == token_lists(again)
    assert token_lists(first) != token_lists(other)
    assert [group[0].tokens for group in first] != [group[0].tokens for group in greedy]


def test_top_k_one_and_tiny_top_p_are_greedy(captioner, prefix, tokenizer):
    greedy = token_lists(run(captioner, prefix, tokenizer, method="greedy"))
    assert token_lists(run(captioner, prefix, tokenizer, method="sample", top_k=1, seed=0)) == greedy
    assert token_lists(run(captioner, prefix, tokenizer, method="sample", top_p=1e-6, seed=0)) == greedy


def test_temperature_changes_the_distribution(captioner, prefix, tokenizer):
    # 600 draws of the first token of one image: a low temperature concentrates them on few tokens.
    def first_tokens(temperature):
        groups = run(
            captioner,
            images(prefix, 0, 1),
            tokenizer,
            method="sample",
            num_captions=600,
            max_length=1,
            temperature=temperature,
            seed=0,
        )
        return collections.Counter(h.tokens[0] for h in groups[0])

    cold, hot = first_tokens(0.05), first_tokens(5.0)
    assert cold.most_common(1)[0][1] > 3 * hot.most_common(1)[0][1]
    assert len(hot) > 2 * len(cold)


def test_filter_logits_keeps_top_k_and_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]
    # The first two tokens hold less than top_p, so a third is needed; a fourth is not.
    kept = torch.isfinite(filter_logits(logits, 0, float(probs[:2].sum()) + 0.01))
    assert kept.tolist() == [[True, True, True, False, False]]


def test_caption_features_batches_and_restores_training_mode(captioner, features, tokenizer, prefix):
    captioner.train()
    try:
        options = DecodingOptions(method="beam", beam_size=3, num_captions=2, max_length=MAX_LENGTH)
        captions = caption_features(captioner, tokenizer, features, options, batch_size=4)
        assert captioner.training
    finally:
        captioner.eval()
    expected = run(captioner, prefix, tokenizer, beam_size=3, num_captions=2)
    assert captions == [[caption_text(tokenizer, h.tokens) for h in group] for group in expected]


def test_flags_round_trip_and_bad_values_are_one_line():
    parser = argparse.ArgumentParser()
    add_decoding_args(parser)
    args = parser.parse_args(["--decode", "sample", "--temperature", "0.7", "--top_p", "0.9", "--seed", "5"])
    options = decoding_options_from_args(args)
    assert (options.method, options.temperature, options.top_p, options.seed) == ("sample", 0.7, 0.9, 5)
    for bad in (
        {"beam_size": 2, "num_captions": 3},
        {"method": "greedy", "num_captions": 2},
        {"method": "sample", "temperature": 0.0},
        {"top_p": 0.0},
        {"max_length": 0},
    ):
        with pytest.raises(InputError):
            DecodingOptions(**bad)


def test_too_long_for_the_lm_is_refused(captioner, prefix, tokenizer):
    with pytest.raises(InputError, match="positions"):
        run(captioner, prefix, tokenizer, max_length=captioner.gpt.config.n_positions)


def test_caption_text_drops_eos_and_folds_white_space(tokenizer):
    tokens = tokenizer.encode(" a red\n\tcircle  on\nblack ") + [tokenizer.eos_token_id]
    assert caption_text(tokenizer, tokens) == "a red circle on black"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cuda_decoding_gives_the_cpu_captions(captioner, features, tokenizer, method):
    options = DecodingOptions(method=method, max_length=MAX_LENGTH)
    on_cpu = caption_features(captioner, tokenizer, features, options, batch_size=4, device="cpu")
    on_cuda = caption_features(captioner.cuda(), tokenizer, features, options, batch_size=4, device="cuda")
    captioner.cpu()
    assert on_cuda == on_cpu  # fp32 on both: the same argmax at every step


@pytest.mark.parametrize("captioner", ["xattn"], indirect=True)
@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_cross_attention_keys_and_values_are_computed_once(captioner, prefix, tokenizer, method):
    # In GPT-2's cross-attention, c_attn turns the patch-token states into keys and values.
    inputs_seen = []
    hooks = [
        block.crossattention.c_attn.register_forward_hook(lambda module, inputs, output: inputs_seen.append(inputs[0]))
        for block in captioner.gpt.transformer.h
    ]
    try:
        run(captioner, prefix, tokenizer, method=method, num_captions=3 if method != "greedy" else 1, seed=0)
    finally:
        for hook in hooks:
            hook.remove()
    # Once per layer, for the images alone: neither per step, nor per beam or sampled caption.
    assert [tuple(states.shape) for states in inputs_seen] == [tuple(prefix.cross_states.shape)] * len(hooks)
