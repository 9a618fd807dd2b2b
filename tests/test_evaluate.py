"""evaluate.py and stages/evaluate.py: the COCO caption metrics, reference formats, bad input."""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import evaluate
from data.errors import InputError, exit_on_input_error
from data.features import FeatureFile, read_feature_file, write_feature_file
from models.checkpoint import build_captioner, load_checkpoint, save_checkpoint
from models.config import CaptionerConfig
from models.decoding import DecodingOptions, caption_features
from models.lm import load_tokenizer
from stages import evaluate as scoring
from stages.evaluate import ptb_tokenize, score_captioner, score_captions

REPO = Path(__file__).resolve().parents[1]
FAST_METRICS = ["Bleu", "ROUGE_L", "CIDEr"]  # no METEOR: its JVM takes seconds to start

# Three test images (COCO ids) with their references; one train image that the test split leaves out.
REFERENCES = {
    101: ["A small red circle above a blue square.", "a red circle over a blue square", "Red circle, blue square!"],
    102: ["Two green triangles on a white background.", "two triangles that are green", "green triangles on white"],
    103: ["A large yellow star next to a black circle.", "a yellow star and a black circle", "a star beside a circle"],
}
TRAIN_IMAGE = (104, ["three purple squares in a row on a gray background"])
PREDICTIONS = {101: "a red circle above a blue square", 102: "two green triangles on a gray background", 103: "a star"}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_predictions(path: Path, predictions: dict) -> Path:
    return write_json(path, [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()])


def write_karpathy(path: Path) -> Path:
    images = [
        {"filepath": "val2014", "filename": f"COCO_val2014_{image_id:012d}.jpg", "cocoid": image_id, "split": split,
         "sentences": [{"raw": caption} for caption in captions]}
        for split, (image_id, captions) in [("test", item) for item in REFERENCES.items()] + [("train", TRAIN_IMAGE)]
    ]  # fmt: skip
    return write_json(path, {"images": images, "dataset": "coco"})


def write_coco(path: Path) -> Path:
    images = [{"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"} for image_id in REFERENCES]
    annotations = [
        {"image_id": image_id, "id": number, "caption": caption}
        for number, (image_id, caption) in enumerate((i, c) for i, captions in REFERENCES.items() for c in captions)
    ]
    return write_json(path, {"images": images, "annotations": annotations})


def write_features(path: Path, feature_dim: int = 16, split: str = "test") -> Path:
    captions = [
        {"image_id": image_id, "caption": caption, "clip_embedding": row}
        for row, (image_id, image_captions) in enumerate(REFERENCES.items())
        for caption in image_captions
    ]
    embeddings = torch.randn(len(REFERENCES), feature_dim, generator=torch.Generator().manual_seed(0))
    write_feature_file(path, FeatureFile(embeddings, captions, {"split": split}))
    return path


def run_evaluate(*argv: str) -> dict:
    return evaluate.main(evaluate.parse_args([str(arg) for arg in argv]))


# ---- independent implementations of BLEU and CIDEr-D, from the papers' formulas ----


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(predictions: dict, references: dict, max_n: int = 4) -> list[float]:
    """Papineni et al.: clipped n-gram precisions over the corpus, brevity penalty with the closest reference
    length (the shorter one on a tie), BLEU-n = BP * geometric mean of p_1..p_n."""
    matched, total = [0] * max_n, [0] * max_n
    hypothesis_length = reference_length = 0
    for image_id, prediction in predictions.items():
        words = prediction.split()
        refs = [reference.split() for reference in references[image_id]]
        hypothesis_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in refs)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(words, n)
            best = Counter()
            for ref in refs:
                best |= ngrams(ref, n)  # max count of each n-gram over the references
            matched[n - 1] += sum(min(count, best[gram]) for gram, count in counts.items())
            total[n - 1] += max(len(words) - n + 1, 0)
    penalty = 1.0 if hypothesis_length >= reference_length else math.exp(1 - reference_length / hypothesis_length)
    precisions = [m / t for m, t in zip(matched, total)]
    return [penalty * math.prod(precisions[:n]) ** (1 / n) for n in range(1, max_n + 1)]


def cider_d(predictions: dict, references: dict, sigma: float = 6.0) -> dict:
    """Vedantam et al. (CIDEr-D as in coco-caption): tf-idf n-gram vectors (idf from the references of the
    evaluated images), clipped cosine similarity, Gaussian length penalty, mean over n = 1..4, x10."""
    num_images = len(references)
    document_frequency = Counter()
    for refs in references.values():
        document_frequency.update({gram for ref in refs for n in range(1, 5) for gram in ngrams(ref.split(), n)})

    def vector(words: list[str], n: int) -> dict:
        return {g: c * math.log(num_images / max(1.0, document_frequency[g])) for g, c in ngrams(words, n).items()}

    scores = {}
    for image_id, prediction in predictions.items():
        words, refs = prediction.split(), [ref.split() for ref in references[image_id]]
        total = 0.0
        for n in range(1, 5):
            hyp = vector(words, n)
            for ref_words in refs:
                ref = vector(ref_words, n)
                dot = sum(min(value, ref.get(gram, 0.0)) * ref.get(gram, 0.0) for gram, value in hyp.items())
                norms = math.sqrt(sum(v * v for v in hyp.values())) * math.sqrt(sum(v * v for v in ref.values()))
                similarity = dot / norms if norms else 0.0
                total += similarity * math.exp(-((len(words) - len(ref_words)) ** 2) / (2 * sigma**2)) / len(refs)
        scores[image_id] = 10 * total / 4
    return scores


# ---- metrics ----


def test_prediction_equal_to_a_reference_scores_perfect_bleu_and_rouge():
    references = {image_id: captions for image_id, captions in REFERENCES.items()}
    predictions = {image_id: captions[0] for image_id, captions in REFERENCES.items()}
    scores = score_captions(predictions, references, FAST_METRICS)
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert scores.overall[key] == pytest.approx(1.0, abs=1e-6), key
        assert all(image[key] == pytest.approx(1.0, abs=1e-6) for image in scores.per_image.values()), key
    assert scores.overall["CIDEr"] > 1.0


def test_hand_checked_bleu_and_cider():
    # Lower-case, no punctuation: the PTB tokenizer leaves these words as they are.
    references = {
        1: ["a dog runs on the grass", "the dog is running"],
        2: ["two cats sit on a mat", "a pair of cats on a mat"],
        3: ["a man rides a red bike", "a person riding a bicycle"],
    }
    predictions = {1: "a dog runs on grass", 2: "two cats on a mat", 3: "a man riding a red bike"}
    scores = score_captions(predictions, references, ["Bleu", "CIDEr"])
    # By hand: every predicted word is in a reference (16 of 16); the closest reference lengths are 4 (a tie
    # between 6 and 4 goes to the shorter), 6 and 6, so r = 16 = c and there is no brevity penalty: BLEU-1 = 1.
    # Bigrams: 3 of 4 ("on grass" is missing), 4 of 4, 4 of 5 ("man riding") -> BLEU-2 = sqrt(1 * 11/13).
    assert scores.overall["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert scores.overall["Bleu_2"] == pytest.approx(math.sqrt(11 / 13), rel=1e-6)
    expected_bleu = corpus_bleu(predictions, references)
    for n, expected in enumerate(expected_bleu, start=1):
        assert scores.overall[f"Bleu_{n}"] == pytest.approx(expected, rel=1e-6), n
    expected_cider = cider_d(predictions, references)
    for image_id, expected in expected_cider.items():
        assert scores.per_image[image_id]["CIDEr"] == pytest.approx(expected, rel=1e-9)
    assert scores.overall["CIDEr"] == pytest.approx(sum(expected_cider.values()) / 3, rel=1e-9)
    assert 0 < expected_bleu[3] < expected_bleu[0] and 0 < scores.overall["CIDEr"] < 10


def test_ptb_tokenize_matches_the_toolkit_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {
        1: ['A man says "hello," then leaves.', "It's a dog's life (really)!", ""],
        "b": ["Two   cats\tsit;\nthey sleep...", "e-mail: x@y.com -- ok?"],
    }
    toolkit_input = {key: [{"caption": caption} for caption in sentences] for key, sentences in captions.items()}
    assert ptb_tokenize(captions) == PTBTokenizer().tokenize(toolkit_input)


def test_an_empty_generated_caption_scores_zero():
    # A barely trained model can stop at once: its empty caption is scored, as zero.
    scores = score_captions({1: "", 2: "two cats on a mat"}, {1: ["a dog"], 2: ["two cats on a mat"]}, FAST_METRICS)
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in scores.per_image[1].values())
    assert scores.per_image[2]["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_spice_is_skipped_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(scoring, "_SPICE_CORENLP_JAR", tmp_path / "absent.jar")
    scores = score_captions({1: "a dog"}, {1: ["a dog runs"]}, ["Bleu", "SPICE"])
    assert "SPICE" not in scores.overall and "get_stanford_models" in scores.skipped["SPICE"]
    assert "Bleu_4" in scores.overall


# ---- evaluate.py end to end ----


def test_script_matches_the_coco_toolkit(tmp_path, monkeypatch):
    """All default metrics through evaluate.py, equal to pycocoevalcap's COCOEvalCap on the same data."""
    import pycocoevalcap.eval as coco_eval
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()  # one METEOR JVM for both runs: starting one takes seconds
    monkeypatch.setattr(scoring, "Meteor", lambda: meteor)
    monkeypatch.setattr(coco_eval, "Meteor", lambda: meteor)
    predictions_path = write_predictions(tmp_path / "preds.json", PREDICTIONS)
    output = tmp_path / "out" / "metrics.json"
    run_evaluate("--predictions", predictions_path, "--references", write_coco(tmp_path / "c.json"), "--output", output)
    report = json.loads(output.read_text())
    assert report["settings"]["image_count"] == 3 and report["settings"]["predictions"] == str(predictions_path)
    assert [image["image_id"] for image in report["per_image"]] == list(REFERENCES)
    assert report["per_image"][0]["caption"] == PREDICTIONS[101]

    class Annotations:  # the two methods of pycocotools' COCO that COCOEvalCap uses
        def __init__(self, captions: dict):
            self.imgToAnns = {i: [{"caption": c} for c in caps] for i, caps in captions.items()}

        def getImgIds(self):
            return list(self.imgToAnns)

    class NoSpice:  # COCOEvalCap always runs SPICE, which needs a model download
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    toolkit = coco_eval.COCOEvalCap(Annotations(REFERENCES), Annotations({i: [c] for i, c in PREDICTIONS.items()}))
    toolkit.evaluate()
    assert set(report["scores"]) == set(toolkit.eval) - {"SPICE"}
    for key, value in report["scores"].items():
        assert value == pytest.approx(float(toolkit.eval[key]), rel=1e-12), key
        for image in report["per_image"]:
            assert image[key] == pytest.approx(float(toolkit.imgToEval[image["image_id"]][key]), rel=1e-12, abs=1e-15)


def test_karpathy_coco_and_feature_file_references_agree(tmp_path):
    predictions = write_predictions(tmp_path / "preds.json", PREDICTIONS)
    common = ["--predictions", predictions, "--metrics", *FAST_METRICS]
    from_karpathy = run_evaluate(
        *common, "--references", write_karpathy(tmp_path / "dataset_coco.json"), "--split", "test"
    )
    from_coco = run_evaluate(*common, "--references", write_coco(tmp_path / "captions_val2014.json"))
    from_features = run_evaluate(*common, "--references", write_features(tmp_path / "test.pkl"))
    assert from_karpathy["settings"]["image_count"] == 3
    assert from_karpathy["scores"] == from_coco["scores"] == from_features["scores"]
    assert from_karpathy["per_image"] == from_coco["per_image"] == from_features["per_image"]
    assert 0 < from_coco["scores"]["CIDEr"] and from_coco["scores"]["Bleu_4"] < 1


@pytest.fixture(scope="module")
def checkpoint_path(tiny_gpt2_dir, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = CaptionerConfig(feature_dim=16, prefix_length=2, lm_name=str(tiny_gpt2_dir))
    path = tmp_path_factory.mktemp("run") / "tiny-000.pt"
    save_checkpoint(path, build_captioner(config))
    return path


def test_checkpoint_captions_a_feature_file_and_scores_it(tmp_path, checkpoint_path):
    features = write_features(tmp_path / "test.pkl")
    output = tmp_path / "metrics.json"
    report = run_evaluate(
        "--checkpoint", checkpoint_path, "--features", features, "--decode", "greedy", "--max_length", "6",
        "--metrics", *FAST_METRICS, "--device", "cpu", "--output", output,
    )  # fmt: skip
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    settings = report["settings"]
    assert settings["checkpoint"] == str(checkpoint_path) and settings["image_count"] == 3
    assert settings["split"] == "test"  # from the feature file's meta
    assert settings["decoding"]["method"] == "greedy" and settings["decoding"]["max_length"] == 6
    model = load_checkpoint(checkpoint_path)
    tokenizer = load_tokenizer(model.config.lm_name)
    embeddings = read_feature_file(features).embeddings  # (3, 16), one row per image
    file_captions = caption_features(model, tokenizer, embeddings, DecodingOptions(method="greedy", max_length=6))
    assert [image["caption"] for image in report["per_image"]] == [captions[0] for captions in file_captions]
    rescored = score_captions({i["image_id"]: i["caption"] for i in report["per_image"]}, REFERENCES, FAST_METRICS)
    assert report["scores"] == rescored.overall


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpoint_on_gpu_in_bf16(tmp_path, checkpoint_path):
    report = run_evaluate(
        "--checkpoint", checkpoint_path, "--features", write_features(tmp_path / "test.pkl"), "--decode", "greedy",
        "--max_length", "6", "--metrics", "Bleu", "CIDEr", "--device", "cuda", "--precision", "bf16",
    )  # fmt: skip
    assert report["settings"]["precision"] == "bf16" and report["settings"]["image_count"] == 3
    assert all(isinstance(image["caption"], str) for image in report["per_image"])


def test_score_captioner_for_training_time_evaluation(tmp_path, checkpoint_path):
    model = load_checkpoint(checkpoint_path).train()
    feature_file = FeatureFile(torch.randn(3, 16), [
        {"image_id": image_id, "caption": caption, "clip_embedding": row}
        for row, (image_id, captions) in enumerate(REFERENCES.items()) for caption in captions
    ])  # fmt: skip
    tokenizer = load_tokenizer(model.config.lm_name)
    options = DecodingOptions(method="greedy", max_length=6)
    scores, captions = score_captioner(
        model, tokenizer, feature_file, options, batch_size=2, device=torch.device("cpu")
    )
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert list(captions) == list(REFERENCES) and all(isinstance(caption, str) for caption in captions.values())
    assert all(0 <= value for value in scores.values())
    assert model.training  # evaluation leaves the model as it found it


def test_captions_without_words_are_named_and_score_zero(tmp_path, capsys):
    predictions = [{"image_id": 101, "caption": " "}, {"image_id": 102, "caption": "."}]
    predictions.append({"image_id": 103, "caption": REFERENCES[103][0]})
    predictions_path = write_json(tmp_path / "preds.json", predictions)
    report = run_evaluate("--predictions", predictions_path, "--references", write_coco(tmp_path / "refs.json"))
    expected = f"warning: 2 caption(s) in {predictions_path} have no word and score 0: image id(s) 101, 102"
    assert expected in capsys.readouterr().out
    per_image = {entry["image_id"]: entry for entry in report["per_image"]}
    assert per_image[101]["Bleu_1"] == pytest.approx(0.0, abs=1e-6) and per_image[101]["CIDEr"] == 0.0
    assert per_image[103]["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


# ---- bad input ----


@pytest.mark.parametrize(
    "predictions, message",
    [
        ([{"image_id": 101, "caption": "a"}, {"image_id": 101, "caption": "b"}, {"image_id": 102, "caption": "c"}],
         "1 image id(s) have more than one caption: 101"),
        ([{"image_id": i, "caption": "a cat"} for i in (101, 102, 103, 7, 8)],
         "2 of 5 image id(s) in PRED have no references in REF: 7, 8"),
        ([{"image_id": str(i), "caption": "a cat"} for i in (101, 102, 103)], "differ only in type"),
        ([{"image_id": 101, "caption": "a cat"}], "2 of 3 image(s) in REF have no prediction in PRED: 102, 103"),
        ([{"image_id": 101}], "entry 0 needs an 'image_id' and a string 'caption'"),
        ({"image_id": 101}, "expected a non-empty COCO results list"),
    ],
)  # fmt: skip
def test_bad_predictions_name_which_and_how_many(tmp_path, predictions, message):
    predictions_path = write_json(tmp_path / "preds.json", predictions)
    references = write_coco(tmp_path / "refs.json")
    with pytest.raises(InputError) as error:
        run_evaluate("--predictions", predictions_path, "--references", references, "--metrics", "Bleu")
    expected = message.replace("PRED", str(predictions_path)).replace("REF", str(references))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_allow_missing_scores_only_the_predicted_images(tmp_path):
    predictions = write_predictions(tmp_path / "preds.json", {101: PREDICTIONS[101], 103: PREDICTIONS[103]})
    references = write_karpathy(tmp_path / "dataset.json")
    report = run_evaluate(
        "--predictions", predictions, "--references", references, "--split", "test", "--allow_missing",
        "--metrics", "Bleu", "CIDEr",
    )  # fmt: skip
    assert report["settings"]["image_count"] == 2 and report["settings"]["images_without_prediction"] == 1
    assert [image["image_id"] for image in report["per_image"]] == [101, 103]
    subset = {101: REFERENCES[101], 103: REFERENCES[103]}  # CIDEr's idf comes from these images' references only
    expected = score_captions({101: PREDICTIONS[101], 103: PREDICTIONS[103]}, subset, ["Bleu", "CIDEr"])
    assert report["scores"] == expected.overall


@pytest.mark.parametrize(
    "make_references, name, split, message",
    [
        (write_karpathy, "dataset.json", None, "a Karpathy file needs a split"),
        (write_features, "test.pkl", "val", "--split val given, but this feature file holds split 'test'"),
        (lambda path: write_json(path, {"images": [{"id": 101, "file_name": "x.jpg"}],
                                        "annotations": [{"image_id": 101, "caption": "  "}]}), "coco.json", None,
         "1 image(s) have an empty reference caption: 101"),
        (lambda path: path, "absent.json", None, "no such references file"),
    ],
)  # fmt: skip
def test_bad_references_are_one_line(tmp_path, make_references, name, split, message):
    references = make_references(tmp_path / name)
    predictions = write_predictions(tmp_path / "preds.json", {101: "a cat"})
    argv = ["--predictions", predictions, "--references", references, "--allow_missing", "--metrics", "Bleu"]
    with pytest.raises(InputError) as error:
        run_evaluate(*argv, *(["--split", split] if split else []))
    assert message in str(error.value) and str(references) in str(error.value)


def test_no_java_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    predictions = write_predictions(tmp_path / "preds.json", PREDICTIONS)
    argv = ["--predictions", str(predictions), "--references", str(write_coco(tmp_path / "c.json"))]
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(SystemExit) as exit_info, exit_on_input_error():
        evaluate.main(evaluate.parse_args(argv))
    assert exit_info.value.code == 2
    error_lines = capsys.readouterr().err.splitlines()
    assert len(error_lines) == 1 and "need Java" in error_lines[0] and "install" in error_lines[0]


def test_script_runs_from_the_repo_root_and_prints_the_table(tmp_path):
    predictions, references = write_predictions(tmp_path / "preds.json", PREDICTIONS), write_coco(tmp_path / "c.json")
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--predictions", predictions, "--references", references, "--metrics", "Bleu", "CIDEr"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()[-7:]
    assert [line.split()[0] for line in table] == ["metric", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "images"]
    assert float(table[5].split()[1]) > 0 and table[6].split()[1] == "3"


def test_sources_must_be_one_of_the_two_modes(tmp_path):
    with pytest.raises(InputError, match="--checkpoint X.pt --features FILE, or --predictions FILE --references FILE"):
        run_evaluate("--predictions", tmp_path / "p.json")
    with pytest.raises(InputError, match="--checkpoint needs --features"):
        run_evaluate("--checkpoint", tmp_path / "x.pt")
