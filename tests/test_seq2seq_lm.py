"""Encoder-decoder LMs (T5, BART; tiny random configs loaded by path) as the captioner's LM: the prefix (and
--prompt) is the encoder's input and the decoder writes the caption. train.py's loss falls, decoding agrees
with itself (cached, batched, beam 1) and with transformers' `generate(inputs_embeds=...)` token for token,
xattn cross-attends with the decoder's own layers, SCST runs, and exports round-trip."""

import json

import pytest
import torch

import evaluate
import export
import predict
import train
from data.errors import InputError
from data.store import read_features
from models.checkpoint import captioner_tokenizer, load_checkpoint, read_checkpoint
from models.decoding import DecodingOptions, caption_features, decode
from models.hf_export import load_captioner
from models.lm import embed_tokens, is_cross_attention_weight, load_lm
from models.tiny import TINY_SEQ2SEQ_SIZES, save_tiny_causal_lm, save_tiny_seq2seq_lm
from tests.conftest import TOKENIZER_TEXTS
from tests.test_evaluate import FAST_METRICS
from tests.test_lm_families import check_lora_defaults_adapt_the_attention_and_merge_back
from tests.test_scst import scst_args
from tests.test_training import CAPTIONS, FEATURE_DIM, read_log, train_args, write_features
from tests.test_xattn import write_patch_tokens, xattn_args

MAX_LENGTH = 12
PROMPT = "a photo of"
EPOCHS = 30
LAST = f"coco_prefix-{EPOCHS - 1:03d}.pt"


@pytest.fixture(scope="module", params=sorted(TINY_SEQ2SEQ_SIZES))
def lm_dir(request, tmp_path_factory):
    return save_tiny_seq2seq_lm(tmp_path_factory.mktemp(request.param), request.param, TOKENIZER_TEXTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Eight images, each with its own caption twice."""
    return write_features(tmp_path_factory.mktemp("seq2seq_data") / "train.pkl", [[text] * 2 for text in CAPTIONS])


def train_run(out_dir, data, lm_dir, *extra):
    """train.py's model and output directory: an MLP prefix of 4 on the tiny encoder-decoder, fine-tuned."""
    args = train_args(
        data, out_dir, lm_dir, "--bs", "8", "--epochs", str(EPOCHS), "--save_every", "100", "--lr", "1e-2", *extra
    )
    return train.main(train.parse_args(args)), out_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, lm_dir):
    return train_run(tmp_path_factory.mktemp("run"), data, lm_dir)


@pytest.fixture(scope="module")
def prompted(tmp_path_factory, data, lm_dir):
    return train_run(tmp_path_factory.mktemp("prompted"), data, lm_dir, "--prompt", PROMPT)


def greedy_tokens(model, conditioning, **options) -> list[list[int]]:
    options = {"method": "greedy", "max_length": MAX_LENGTH, **options}
    eos = captioner_tokenizer(model).eos_token_id
    return [group[0].tokens for group in decode(model, conditioning, eos, DecodingOptions(**options))]


def test_train_py_lowers_the_loss_and_learns_the_captions(trained, data, lm_dir):
    model, out_dir = trained
    losses = [record["loss"] for record in read_log(out_dir) if "loss" in record]
    assert sum(losses[-2:]) / 2 < 0.3 * losses[0]
    loaded = load_checkpoint(out_dir / LAST)
    assert type(loaded.gpt).__name__.endswith("ForConditionalGeneration")
    features = read_features(data).embeddings
    tokens = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.eval()(features[:3], tokens, torch.ones_like(tokens)).logits
        assert torch.equal(loaded(features[:3], tokens, torch.ones_like(tokens)).logits, expected)
    captions = caption_features(loaded, captioner_tokenizer(loaded), features, DecodingOptions(method="greedy"))
    assert sum(caption[0] == " ".join(text.split()) for caption, text in zip(captions, CAPTIONS)) >= 6


@pytest.mark.parametrize("run", ["trained", "prompted"])
def test_decoding_agrees_with_itself_and_with_transformers_generate(run, request, data, lm_dir):
    model, _ = request.getfixturevalue(run)
    model.eval()
    features = read_features(data).embeddings  # (8, D)
    tokenizer = captioner_tokenizer(model)
    with torch.no_grad():
        conditioning = model.condition(features)
        encoder_input = model.layout.encoder_input(model.gpt, model.map_features(features))  # (8, P+K, E)
        generated = model.gpt.generate(
            inputs_embeds=encoder_input,
            attention_mask=torch.ones(encoder_input.shape[:2], dtype=torch.long),
            max_new_tokens=MAX_LENGTH,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    eos = tokenizer.eos_token_id
    theirs = []
    for row in generated[:, 1:].tolist():  # the decoder's sequences: its start token first
        theirs.append(row[: row.index(eos) + 1] if eos in row else row)
    cached = greedy_tokens(model, conditioning)
    assert len({tuple(tokens) for tokens in cached}) > 4  # the images get different captions: a real comparison
    assert cached == theirs
    assert greedy_tokens(model, conditioning, use_cache=False) == cached
    prefix, states = conditioning.prefix, conditioning.cross_states
    rows = [type(conditioning)(prefix[i : i + 1], states[i : i + 1]) for i in range(features.shape[0])]
    one_at_a_time = [greedy_tokens(model, row)[0] for row in rows]
    assert one_at_a_time == cached
    assert greedy_tokens(model, conditioning, method="beam", beam_size=1) == cached
    beams = greedy_tokens(model, conditioning, method="beam", beam_size=3)
    assert greedy_tokens(model, conditioning, method="beam", beam_size=3, use_cache=False) == beams


def test_the_prompt_is_the_encoders_input_after_the_prefix_and_is_recorded(prompted, trained, data):
    model, out_dir = prompted
    loaded = load_checkpoint(out_dir / LAST)
    assert loaded.config.prompt == PROMPT and trained[0].config.prompt is None
    ids = captioner_tokenizer(loaded)(PROMPT, add_special_tokens=False)["input_ids"]
    assert loaded.layout.prompt_ids.tolist() == ids
    features = read_features(data).embeddings[:2]
    with torch.no_grad():
        mapped = loaded.map_features(features)  # (2, 4, E)
        encoder_input = loaded.layout.encoder_input(loaded.gpt, mapped)
        assert encoder_input.shape[1] == 4 + len(ids)
        assert torch.equal(encoder_input[:, :4], mapped)
        assert torch.equal(encoder_input[:, 4:], embed_tokens(loaded.gpt, torch.tensor([ids, ids])))
        assert loaded.condition(features).cross_states.shape[1] == 4 + len(ids)
        # Without the prompt the same weights encode something else.
        loaded.layout.prompt_ids = loaded.layout.prompt_ids[:0]
        assert loaded.condition(features).cross_states.shape[1] == 4


def test_a_prompt_needs_an_encoder_decoder_and_a_prefix_mapper(tmp_path, data, capsys):
    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2", TOKENIZER_TEXTS)
    with pytest.raises(InputError, match=r"--prompt 'a photo of': a prompt is an encoder-decoder's .*gpt2 is a causal"):
        train.main(train.parse_args(train_args(data, tmp_path / "run", gpt2, "--epochs", "1", "--prompt", PROMPT)))
    with pytest.raises(SystemExit):
        train.parse_args(xattn_args(data, tmp_path / "xattn", gpt2, "--prompt", PROMPT))
    assert "--prompt: --mapping_type xattn has no prefix mapper" in capsys.readouterr().err


def test_xattn_cross_attends_to_patch_tokens_with_the_decoders_own_layers(tmp_path, lm_dir):
    tokens = write_patch_tokens(tmp_path / "tokens.pkl", [[text] * 2 for text in CAPTIONS])
    out_dir = tmp_path / "xattn"
    model = train.main(
        train.parse_args(xattn_args(tokens, out_dir, lm_dir, "--epochs", str(EPOCHS), "--save_every", "100"))
    )
    pristine = load_lm(str(lm_dir)).state_dict()
    # The encoder never ran: its own weights did not train; the decoder's and the shared embeddings did.
    trained = {name for name, tensor in model.gpt.state_dict().items() if not torch.equal(tensor, pristine[name])}
    assert trained and not any("encoder." in name and "embed_tokens" not in name for name in trained)
    assert any("decoder." in name for name in trained)
    losses = [record["loss"] for record in read_log(out_dir) if "loss" in record]
    assert sum(losses[-2:]) / 2 < 0.3 * losses[0]
    loaded = load_checkpoint(out_dir / LAST)
    assert loaded.config.cross_attention and loaded.config.prefix_length == 1
    with torch.no_grad():
        conditioning = loaded.condition(read_features(tokens).embeddings)  # the patch states (8, T, E); no encoder
    assert conditioning.cross_states.shape[1] == 5 and conditioning.prefix.shape[1] == 1
    cached = greedy_tokens(loaded, conditioning)
    assert greedy_tokens(loaded, conditioning, use_cache=False) == cached
    assert greedy_tokens(loaded, conditioning, method="beam", beam_size=1) == cached
    tokenizer = captioner_tokenizer(loaded)
    captions = caption_features(loaded, tokenizer, read_features(tokens).embeddings, DecodingOptions())
    # Each image gets its own caption back: the patch tokens, through cross-attention, carry the image.
    assert sum(caption[0] == " ".join(text.split()) for caption, text in zip(captions, CAPTIONS)) >= 6


def test_xattn_with_a_frozen_lm_trains_and_stores_only_the_decoders_cross_attention(tmp_path, lm_dir):
    tokens = write_patch_tokens(tmp_path / "tokens.pkl", [[text] * 2 for text in CAPTIONS])
    out_dir = tmp_path / "frozen"
    model = train.main(train.parse_args(xattn_args(tokens, out_dir, lm_dir, "--epochs", "2", "--only_prefix")))
    stored = [name for name in read_checkpoint(out_dir / "coco_prefix-001.pt")["model"] if name.startswith("gpt.")]
    assert stored and all(is_cross_attention_weight(name) and ".decoder." in name for name in stored)
    pristine = load_lm(str(lm_dir)).state_dict()
    changed = [name for name, tensor in model.gpt.state_dict().items() if not torch.equal(tensor, pristine[name])]
    assert changed and all(is_cross_attention_weight(name) for name in changed)
    loaded = load_checkpoint(out_dir / "coco_prefix-001.pt")
    assert loaded.lm_frozen
    assert all(torch.equal(tensor, model.gpt.state_dict()[name]) for name, tensor in loaded.gpt.state_dict().items())


def test_an_scst_step_runs(trained, data, tmp_path):
    _, out_dir = trained
    checkpoint = out_dir / LAST
    model = train.main(train.parse_args(scst_args(data, checkpoint, tmp_path / "scst", "--epochs", "1")))
    steps = [record for record in read_log(tmp_path / "scst", "scst") if "loss" in record]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(record["loss"])) for record in steps)
    before, after = load_checkpoint(checkpoint).state_dict(), model.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith("clip_project."))


def test_an_export_captions_as_its_checkpoint(prompted, data, tmp_path):
    _, out_dir = prompted
    checkpoint, exported = out_dir / LAST, tmp_path / "export"
    export.main(export.parse_args([str(checkpoint), str(exported)]))
    features = read_features(data).embeddings
    captions = {}
    for name, source in (("checkpoint", checkpoint), ("export", exported)):
        model = load_captioner(source)
        captions[name] = caption_features(model, captioner_tokenizer(model), features, DecodingOptions(method="greedy"))
    assert captions["export"] == captions["checkpoint"]
    assert load_captioner(exported).config.prompt == PROMPT
    output = tmp_path / "preds.json"
    args = ["--features", str(data), "--checkpoint", str(exported), "--decode", "greedy", "--output", str(output)]
    predict.main(predict.parse_args(args))
    by_image = {prediction["image_id"]: prediction["caption"] for prediction in json.loads(output.read_text())}
    assert by_image == {row: caption[0] for row, caption in enumerate(captions["checkpoint"])}


def test_xattn_refusal_names_the_families_with_cross_attention(tmp_path):
    llama = save_tiny_causal_lm(tmp_path / "llama", "llama", TOKENIZER_TEXTS)
    with pytest.raises(
        InputError, match=r"\(llama\) has no cross-attention .*gpt2, and encoder-decoders such as t5 and bart"
    ):
        load_lm(str(llama), cross_attention=True)


def test_a_checkpoint_declaring_more_decoder_blocks_than_it_holds_is_refused(trained, lm_dir, tmp_path):
    _, out_dir = trained
    checkpoint = torch.load(out_dir / LAST, weights_only=True)
    decoder_layers = "num_decoder_layers" if "t5" in str(lm_dir) else "decoder_layers"
    checkpoint["config"]["lm_config"][decoder_layers] = 40
    bloated = tmp_path / "bloated.pt"
    torch.save(checkpoint, bloated)
    with pytest.raises(InputError, match="the LM config declares 42 blocks, the weights hold 4"):
        load_checkpoint(bloated)


def test_lora_defaults_adapt_the_attention_and_merge_back(lm_dir):
    features = torch.randn(3, FEATURE_DIM, generator=torch.Generator().manual_seed(1))
    check_lora_defaults_adapt_the_attention_and_merge_back(lm_dir, features)


def test_evaluate_py_scores_seeded_sampled_captions(trained, data, tmp_path):
    _, out_dir = trained
    argv = [
        "--checkpoint", str(out_dir / LAST), "--features", str(data), "--decode", "sample", "--seed", "3",
        "--max_length", str(MAX_LENGTH), "--metrics", *FAST_METRICS, "--device", "cpu",
    ]  # fmt: skip
    report = evaluate.main(evaluate.parse_args(argv))
    model = load_captioner(out_dir / LAST)
    options = DecodingOptions(method="sample", seed=3, max_length=MAX_LENGTH)
    sampled = caption_features(model, captioner_tokenizer(model), read_features(data).embeddings, options)
    assert [image["caption"] for image in report["per_image"]] == [captions[0] for captions in sampled]
    assert report["scores"]["CIDEr"] > 0
