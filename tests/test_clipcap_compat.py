"""Compatibility with ClipCap: its state-dict layout loads here and ours loads into its classes
(both mappers, legacy GPT-2 buffers included), and our per-batch padded loss is its fixed-length loss
minus its quirk of ignoring token 0."""

import pytest
import torch
import torch.nn.functional as F

from bench.clipcap_reference import ClipCaptionModel as ReferenceModel
from bench.clipcap_reference import MappingType, clipcap_loss, pad_tokens
from data.captions import CaptionCollator
from models.captioner import IGNORE_INDEX
from models.checkpoint import build_captioner, load_clipcap_weights, save_checkpoint
from models.config import CaptionerConfig
from models.lm import load_lm, load_tokenizer

FEATURE_DIM = 16
PREFIX_LENGTH = 4
CAPTIONS = [
    "a small red circle above a blue square",
    "two green triangles",
    "a large yellow star next to a black circle",
]


def reference_model(lm_dir, mapping_type: str) -> ReferenceModel:
    torch.manual_seed(1)
    model = ReferenceModel(
        PREFIX_LENGTH,
        load_lm(str(lm_dir)),
        clip_length=3,
        prefix_size=FEATURE_DIM,
        num_layers=2,
        mapping_type=MappingType(mapping_type),
    )
    return model.eval()


def our_config(lm_dir, mapping_type: str) -> CaptionerConfig:
    return CaptionerConfig(
        feature_dim=FEATURE_DIM,
        prefix_length=PREFIX_LENGTH,
        prefix_length_clip=3,
        mapping_type=mapping_type,
        num_layers=2,
        lm_name=str(lm_dir),
    )


def load_state(lm_dir, reference: ReferenceModel):
    """Our model with the reference's weights."""
    model = build_captioner(our_config(lm_dir, "mlp")).eval()
    model.load_state_dict(reference.state_dict())
    return model


def with_legacy_buffers(state: dict, lm) -> dict:
    """Add the `attn.bias` / `attn.masked_bias` buffers that GPT-2 checkpoints of older transformers carry."""
    state = dict(state)
    positions = lm.config.n_positions
    for layer in range(lm.config.n_layer):
        causal = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
        state[f"gpt.transformer.h.{layer}.attn.bias"] = causal
        state[f"gpt.transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def batch_of(tokenizer, texts: list[str], eos: bool = True):
    ids = [
        torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else []))
        for text in texts
    ]
    features = torch.randn(len(texts), FEATURE_DIM, generator=torch.Generator().manual_seed(2))
    return CaptionCollator(tokenizer.pad_token_id)(list(zip(features, ids)))


def reference_inputs(batch, length: int):
    """The batch as ClipCap's dataset gives it: padded to `length`, mask over prefix + tokens."""
    rows = [
        pad_tokens(tokens[mask.bool()], length, PREFIX_LENGTH)
        for tokens, mask in zip(batch.tokens, batch.attention_mask)
    ]
    return torch.stack([tokens for tokens, _ in rows]), torch.stack([mask for _, mask in rows])


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_clipcap_state_dict_loads_into_our_model(tiny_gpt2_dir, tmp_path, mapping_type):
    reference = reference_model(tiny_gpt2_dir, mapping_type)
    path = tmp_path / "clipcap.pt"
    torch.save(with_legacy_buffers(reference.state_dict(), reference.gpt), path)

    ours = load_clipcap_weights(path, our_config(tiny_gpt2_dir, mapping_type))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    batch = batch_of(load_tokenizer(str(tiny_gpt2_dir)), CAPTIONS)
    tokens, mask = reference_inputs(batch, batch.tokens.shape[1])
    with torch.no_grad():
        expected = reference(tokens, batch.features, mask).logits[:, PREFIX_LENGTH - 1 : -1]
        logits = ours(batch.features, batch.tokens, batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_our_checkpoint_loads_into_clipcap_classes(tiny_gpt2_dir, tmp_path, mapping_type):
    torch.manual_seed(3)
    ours = build_captioner(our_config(tiny_gpt2_dir, mapping_type)).eval()
    save_checkpoint(tmp_path / "ours.pt", ours)
    state = torch.load(tmp_path / "ours.pt", weights_only=True)["model"]

    reference = reference_model(tiny_gpt2_dir, mapping_type)
    reference.load_state_dict(state, strict=True)  # every key ClipCap has, nothing else
    batch = batch_of(load_tokenizer(str(tiny_gpt2_dir)), CAPTIONS)
    tokens, mask = reference_inputs(batch, 20)
    with torch.no_grad():
        expected = reference(tokens, batch.features, mask).logits[:, PREFIX_LENGTH - 1 : -1]
        logits = ours(batch.features, batch.tokens, batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[:, : batch.tokens.shape[1]][real], rtol=1e-5, atol=1e-5)


def test_per_batch_padding_loss_equals_fixed_length_loss(tiny_gpt2_dir):
    tokenizer = load_tokenizer(str(tiny_gpt2_dir))
    model = build_captioner(our_config(tiny_gpt2_dir, "mlp")).eval()
    batch = batch_of(tokenizer, CAPTIONS)
    padding = 25 - batch.tokens.shape[1]  # ClipCap pads every caption to one fixed length
    fixed_tokens = F.pad(batch.tokens, (0, padding), value=tokenizer.pad_token_id)
    fixed_mask = F.pad(batch.attention_mask, (0, padding), value=0)
    with torch.no_grad():
        per_batch = model(batch.features, batch.tokens, batch.attention_mask).loss
        fixed = model(batch.features, fixed_tokens, fixed_mask).loss
    torch.testing.assert_close(per_batch, fixed, rtol=1e-6, atol=1e-6)


def test_loss_counts_token_zero_and_matches_clipcap_otherwise(tiny_gpt2_dir):
    tokenizer = load_tokenizer(str(tiny_gpt2_dir))
    reference = reference_model(tiny_gpt2_dir, "mlp")
    model = load_state(tiny_gpt2_dir, reference)
    # ClipCap appends no EOS; without token 0 in the captions both losses are the same mean.
    batch = batch_of(tokenizer, CAPTIONS, eos=False)
    assert not (batch.tokens[batch.attention_mask.bool()] == 0).any()
    tokens, mask = reference_inputs(batch, 25)
    with torch.no_grad():
        ours = model(batch.features, batch.tokens, batch.attention_mask).loss
        theirs = clipcap_loss(reference, tokens, mask, batch.features)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # A real token 0 (GPT-2's "!"; EOS in the tiny tokenizer) is learned here: every real position counts.
    batch.tokens[0, 1] = 0
    with torch.no_grad():
        output = model(batch.features, batch.tokens, batch.attention_mask)
    labels = batch.tokens.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
    by_hand = (
        F.cross_entropy(output.logits.flatten(0, 1), labels.flatten(), reduction="sum") / batch.attention_mask.sum()
    )
    torch.testing.assert_close(output.loss, by_hand)
    assert int((labels == 0).sum()) == 1
