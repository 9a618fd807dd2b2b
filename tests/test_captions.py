"""The caption dataset: tokenization with EOS, the token cache, per-batch padding, no mutation, and a
caption that is no text refused in one line."""

import re

import pytest
import torch
from torch.utils.data import DataLoader

import data.captions as captions_module
import train
from data.captions import (
    CaptionCollator,
    build_caption_dataset,
    default_cache_dir,
    load_or_tokenize,
)
from data.errors import InputError
from data.features import FeatureFile, write_feature_file
from models.lm import load_tokenizer
from models.tiny import train_tokenizer
from tests.conftest import TOKENIZER_TEXTS

TEXTS = sorted(set(TOKENIZER_TEXTS))


def feature_file(texts: list[str] = TEXTS, feature_dim: int = 8) -> FeatureFile:
    """Two captions per image, rows in order."""
    embeddings = torch.randn(len(texts) // 2 + 1, feature_dim, generator=torch.Generator().manual_seed(0))
    captions = [
        {"image_id": number // 2, "caption": text, "clip_embedding": number // 2} for number, text in enumerate(texts)
    ]
    return FeatureFile(embeddings, captions, {})


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    return load_tokenizer(str(tiny_gpt2_dir))


def test_tokens_end_with_eos_and_match_the_tokenizer(tokenizer, tmp_path):
    dataset = build_caption_dataset(feature_file(), tokenizer, cache_dir=tmp_path)
    assert len(dataset) == len(TEXTS)
    for index, text in enumerate(TEXTS):
        features, tokens = dataset[index]
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokens.tolist() == expected
        assert torch.equal(features, dataset.embeddings[index // 2])


def test_cache_is_reused_and_keyed_by_tokenizer_and_captions(tokenizer, tmp_path, monkeypatch):
    captions = feature_file().captions
    first = load_or_tokenize(captions, tokenizer, tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == [f"{first.key}.offsets.npy", f"{first.key}.tokens.npy"]

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(captions_module, "tokenize_captions", refuse)
    cached = load_or_tokenize(captions, tokenizer, tmp_path)
    assert torch.equal(cached.tokens, first.tokens) and torch.equal(cached.offsets, first.offsets)
    monkeypatch.undo()

    edited = [dict(caption) for caption in captions]
    edited[0]["caption"] += " again"
    other_tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    keys = {first.key, load_or_tokenize(edited, tokenizer, tmp_path).key}
    keys.add(load_or_tokenize(captions, other_tokenizer, tmp_path).key)
    assert len(keys) == 3
    assert len(list(tmp_path.iterdir())) == 6  # tokens and offsets of each


def test_damaged_cache_is_rebuilt(tokenizer, tmp_path):
    captions = feature_file().captions
    first = load_or_tokenize(captions, tokenizer, tmp_path)
    (tmp_path / f"{first.key}.tokens.npy").write_bytes(b"not an array")
    again = load_or_tokenize(captions, tokenizer, tmp_path)
    assert torch.equal(again.tokens, first.tokens)


def test_default_cache_is_not_beside_the_data(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPCAP_PLUS_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CLIPCAP_PLUS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "clipcap-plus"


def test_collate_pads_per_batch_with_a_mask_of_real_tokens(tokenizer, tmp_path):
    dataset = build_caption_dataset(feature_file(), tokenizer, cache_dir=tmp_path)
    items = [dataset[index] for index in range(4)]
    batch = CaptionCollator(pad_token_id=tokenizer.pad_token_id)(items)
    lengths = [tokens.numel() for _, tokens in items]
    assert batch.tokens.shape == (4, max(lengths))
    assert batch.features.shape == (4, 8)
    assert batch.attention_mask.sum(dim=1).tolist() == lengths
    for row, (_, tokens) in enumerate(items):
        assert torch.equal(batch.tokens[row, : lengths[row]], tokens.long())
        assert (batch.tokens[row, lengths[row] :] == tokenizer.pad_token_id).all()
        assert (batch.attention_mask[row, lengths[row] :] == 0).all()


def test_max_tokens_cuts_long_captions(tokenizer, tmp_path):
    dataset = build_caption_dataset(feature_file(), tokenizer, max_tokens=3, cache_dir=tmp_path)
    assert max(dataset[index][1].numel() for index in range(len(dataset))) == 3


def test_reading_items_changes_nothing(tokenizer, tmp_path):
    dataset = build_caption_dataset(feature_file(), tokenizer, cache_dir=tmp_path)
    before = (dataset.embeddings.clone(), dataset.tokenized.tokens.clone(), dataset.tokenized.offsets.clone())
    loader = DataLoader(dataset, batch_size=3, shuffle=True, collate_fn=CaptionCollator(tokenizer.pad_token_id))
    epochs = [[(batch.tokens.clone(), batch.attention_mask.clone()) for batch in loader] for _ in range(2)]
    # ClipCap's dataset padded in place and broke its masks from the second epoch on (its issue #34).
    assert sum(int(mask.sum()) for _, mask in epochs[0]) == sum(int(mask.sum()) for _, mask in epochs[1])
    after = (dataset.embeddings, dataset.tokenized.tokens, dataset.tokenized.offsets)
    assert all(torch.equal(old, new) for old, new in zip(before, after))


def test_a_lone_surrogate_caption_is_one_line_from_train(tmp_path, tiny_gpt2_dir):
    """A pickle keeps a caption holding half a surrogate pair (JSON's "\\ud800"), which has no UTF-8: train.py
    refuses it in one line naming the caption and its image, not with a UnicodeEncodeError traceback."""
    data = tmp_path / "train.pkl"
    write_feature_file(data, feature_file([*TEXTS[:3], "a red \ud800 circle"]))
    args = ["--data", str(data), "--out_dir", str(tmp_path / "run"), "--gpt2", str(tiny_gpt2_dir)]
    args += ["--cache_dir", str(tmp_path / "cache"), "--bs", "2", "--device", "cpu"]
    message = re.escape("caption 3 (image_id 1) holds a lone surrogate '\\ud800' at character 6")
    with pytest.raises(InputError, match=message):
        train.main(train.parse_args(args))
