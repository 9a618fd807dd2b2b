"""The prefix captioner over causal LMs of every common family (tiny random configs with each family's special
tokens, loaded by path): the caption layout is the same in training and decoding, train.py's loss falls, an
SCST step runs and the export captions as its checkpoint; decoding agrees with itself (cached, batched, beam 1)
and with transformers' own `generate(inputs_embeds=...)`; LoRA's default targets merge back exactly."""

import json
import math

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import BertConfig, BertModel

import export
import train
from data.captions import tokenize_captions
from data.errors import InputError
from data.store import read_features
from models.checkpoint import build_captioner, captioner_tokenizer, load_checkpoint
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, caption_features, decode
from models.hf_export import load_captioner
from models.lm import load_lm, load_tokenizer, lora_targets
from models.lora import add_adapters, merge_adapters
from models.tiny import ADDS_BOS, FAMILY_SPECIAL_TOKENS, TINY_LM_SIZES, save_tiny_causal_lm
from tests.conftest import TOKENIZER_TEXTS
from tests.test_scst import scst_args
from tests.test_training import CAPTIONS, FEATURE_DIM, read_log, train_args, write_features

NUM_IMAGES = 5
MAX_LENGTH = 12


@pytest.fixture(scope="module", params=sorted(TINY_LM_SIZES))
def lm_dir(request, tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp(request.param), request.param, TOKENIZER_TEXTS)


@pytest.fixture(scope="module")
def captioner(lm_dir):
    torch.manual_seed(0)
    config = CaptionerConfig(feature_dim=FEATURE_DIM, prefix_length=4, mapping_type="mlp", lm_name=str(lm_dir))
    return build_captioner(config, load_lm(str(lm_dir))).eval()


@pytest.fixture(scope="module")
def features():
    return torch.randn(NUM_IMAGES, FEATURE_DIM, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def conditioning(captioner, features):
    with torch.no_grad():
        return captioner.condition(features)


def greedy_tokens(captioner, conditioning, eos: int, **options) -> list[list[int]]:
    options = {"method": "greedy", "max_length": MAX_LENGTH, **options}
    return [group[0].tokens for group in decode(captioner, conditioning, eos, DecodingOptions(**options))]


def test_greedy_equals_transformers_generate(captioner, conditioning, lm_dir):
    eos = load_tokenizer(str(lm_dir)).eos_token_id
    prefix = conditioning.prefix
    with torch.no_grad():
        generated = captioner.gpt.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
            max_new_tokens=MAX_LENGTH,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    theirs = []
    for row in generated.tolist():  # with inputs_embeds alone, generate returns the new tokens only
        theirs.append(row[: row.index(eos) + 1] if eos in row else row)
    assert greedy_tokens(captioner, conditioning, eos) == theirs


def test_cached_batched_and_beam_one_decoding_agree(captioner, conditioning, lm_dir):
    eos = load_tokenizer(str(lm_dir)).eos_token_id
    cached = greedy_tokens(captioner, conditioning, eos)
    assert greedy_tokens(captioner, conditioning, eos, use_cache=False) == cached
    one_at_a_time = [
        greedy_tokens(captioner, type(conditioning)(conditioning.prefix[i : i + 1]), eos)[0] for i in range(NUM_IMAGES)
    ]
    assert one_at_a_time == cached
    assert greedy_tokens(captioner, conditioning, eos, method="beam", beam_size=1) == cached


def test_training_tokens_are_the_caption_without_bos_then_the_families_eos(lm_dir):
    family = json.loads((lm_dir / "config.json").read_text())["model_type"]
    tokenizer = load_tokenizer(str(lm_dir))
    text = CAPTIONS[0]
    bare = tokenizer(text, add_special_tokens=False)["input_ids"]
    if family in ADDS_BOS:  # the fixture is as its hub tokenizer: BOS first when special tokens are added
        assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, *bare]
    assert tokenizer.eos_token == FAMILY_SPECIAL_TOKENS.get(family, {}).get("eos_token", "<|endoftext|>")
    assert tokenizer.pad_token_id is not None  # set to EOS where the family has none
    trained = tokenize_captions([{"caption": text, "image_id": 0}], tokenizer)
    assert trained.tokens.tolist() == [*bare, tokenizer.eos_token_id]


def test_decoding_scores_its_captions_as_training_does(captioner, features, conditioning, lm_dir):
    """The layouts agree: a greedy caption's log-probability in decoding (prefix, then the tokens one by one
    from the cache) equals the teacher-forced pass's over [prefix][the same tokens], as training computes it."""
    tokenizer = load_tokenizer(str(lm_dir))
    options = DecodingOptions(method="greedy", max_length=MAX_LENGTH)
    hypotheses = [group[0] for group in decode(captioner, conditioning, tokenizer.eos_token_id, options)]
    for image, hypothesis in enumerate(hypotheses):
        tokens = torch.tensor([hypothesis.tokens])
        with torch.no_grad():
            logits = captioner(features[image : image + 1], tokens, torch.ones_like(tokens), compute_loss=False).logits
        teacher_forced = logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).sum()
        assert teacher_forced.item() == pytest.approx(hypothesis.log_prob, abs=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm_dir):
    """A train.py run on the family: its data (two different references per image, as SCST's CIDEr needs),
    output directory and returned model."""
    root = tmp_path_factory.mktemp("run")
    references = [[text, CAPTIONS[(row + 1) % len(CAPTIONS)]] for row, text in enumerate(CAPTIONS)]
    data = write_features(root / "train.pkl", references)
    args = train_args(data, root / "run", lm_dir, "--bs", "8", "--epochs", "6", "--save_every", "100", "--lr", "1e-2")
    return data, root / "run", train.main(train.parse_args(args))


def test_train_py_lowers_the_loss_and_the_checkpoint_reloads(trained):
    _, out_dir, model = trained
    losses = [record["loss"] for record in read_log(out_dir) if "loss" in record]
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0]
    loaded = load_checkpoint(out_dir / "coco_prefix_latest.pt")
    features = torch.randn(3, FEATURE_DIM, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.eval()(features, tokens, torch.ones_like(tokens)).logits
        assert torch.equal(loaded(features, tokens, torch.ones_like(tokens)).logits, expected)


def test_an_scst_step_runs_and_the_export_captions_as_the_checkpoint(trained, tmp_path):
    data, out_dir, _ = trained
    checkpoint = out_dir / "coco_prefix-005.pt"
    model = train.main(train.parse_args(scst_args(data, checkpoint, tmp_path / "scst", "--epochs", "1")))
    steps = [record for record in read_log(tmp_path / "scst", "scst") if "loss" in record]
    assert steps and all(math.isfinite(record["loss"]) for record in steps)
    before, after = load_checkpoint(checkpoint).state_dict(), model.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    exported = tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(exported)]))
    features = read_features(data).embeddings
    options = DecodingOptions(method="beam", beam_size=3, max_length=MAX_LENGTH)
    captions = [
        caption_features(model, captioner_tokenizer(model), features, options)
        for model in (load_captioner(checkpoint), load_captioner(exported))
    ]
    assert captions[1] == captions[0] and len({caption[0] for caption in captions[0]}) > 1


def test_xattn_with_an_lm_without_cross_attention_is_one_line(tmp_path):
    llama = save_tiny_causal_lm(tmp_path / "llama", "llama", TOKENIZER_TEXTS)
    with pytest.raises(InputError, match=r"\(llama\) has no cross-attention layers .*families that have them: gpt2"):
        load_lm(str(llama), cross_attention=True)


def test_a_model_without_a_language_modelling_head_is_one_line(tmp_path, tiny_clip_dir):
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(bert)
    with pytest.raises(InputError, match=r"is a BertModel \(bert\), which has no language-modelling head"):
        load_lm(str(bert))
    with pytest.raises(InputError, match=r"is a CLIPVisionModelWithProjection \(clip_vision_model\)"):
        load_lm(str(tiny_clip_dir))


def test_an_unknown_lm_is_one_line(tmp_path):
    with pytest.raises(InputError, match="cannot load language model 'no-such-org/no-such-lm'"):
        load_lm("no-such-org/no-such-lm")
    with pytest.raises(InputError, match="cannot load language model"):
        load_lm(str(tmp_path))  # a directory without a config.json


def check_lora_defaults_adapt_the_attention_and_merge_back(lm_dir, features) -> None:
    """The family's default LoRA targets (models/lm.py) exist, are attention projections, and an export's
    merge of the adapters computes what the adapted LM does. Shared with tests/test_seq2seq_lm.py."""
    lm = load_lm(str(lm_dir))
    targets = lora_targets(lm.config.model_type, str(lm_dir))
    adapted = add_adapters(lm, {"r": 2, "alpha": 4, "dropout": 0.0, "targets": targets}, str(lm_dir))
    wrapped = [name for name, module in adapted.named_modules() if isinstance(module, BaseTunerLayer)]
    assert wrapped and all("attn" in name.lower() or "attention" in name.lower() for name in wrapped), wrapped
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.5)  # B starts at zero: make the adapters change what the LM computes
    config = CaptionerConfig(feature_dim=FEATURE_DIM, prefix_length=4, mapping_type="mlp", lm_name=str(lm_dir))
    model = build_captioner(config, adapted).eval()
    tokens = torch.randint(0, 100, (features.shape[0], 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(features, tokens, torch.ones_like(tokens), compute_loss=False).logits
        merge_adapters(model.gpt)
        assert not any(isinstance(module, BaseTunerLayer) for module in model.gpt.modules())
        after = model(features, tokens, torch.ones_like(tokens), compute_loss=False).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_lora_defaults_adapt_the_attention_and_merge_back(lm_dir, features):
    check_lora_defaults_adapt_the_attention_and_merge_back(lm_dir, features)
