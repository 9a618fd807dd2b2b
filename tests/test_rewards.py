"""SCST's rewards and loss: CIDEr-D equals pycocoevalcap's Cider, the Python caption normalization equals
the PTB tokenizer on captions, CLIP-S by hand, each --reward the weighted sum of its registered terms, the
mean-of-others baseline, and the loss's sign."""

import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocoevalcap.cider.cider import Cider

from data.errors import InputError
from data.features import FeatureFile
from models.checkpoint import build_captioner
from models.clip_score import ClipScorer
from models.config import CaptionerConfig
from models.lm import load_lm
from models.tiny import save_tiny_clip_model
from stages.evaluate import ptb_tokenize
from stages.rewards import REWARD_TERMS, REWARDS, CiderD, mean_of_others, normalize_caption, policy_gradient_loss
from stages.scst import RewardScorer, token_log_probs
from tests.conftest import TOKENIZER_TEXTS

WORDS = "a the man dog red blue on in with two sitting riding bike street park of small large".split()


def random_caption(rng: random.Random, shortest: int, longest: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(shortest, longest)))


@pytest.mark.parametrize("seed", [0, 1])
def test_cider_d_equals_pycocoevalcap(seed):
    rng = random.Random(seed)
    # 400 images, 1-6 references each, candidates of 0-14 words (empty and one-word ones included)
    references = {i: [random_caption(rng, 1, 12) for _ in range(rng.randint(1, 6))] for i in range(400)}
    candidates = {i: [random_caption(rng, 0, 14)] for i in references}
    corpus_score, theirs = Cider().compute_score(references, candidates)
    ours = CiderD(references).scores(list(references), [candidates[i][0] for i in references])
    assert np.abs(np.array(ours) - theirs).max() < 1e-6
    assert abs(np.mean(ours) - corpus_score) < 1e-6
    assert max(ours) > 1.0  # not a degenerate all-zero comparison


def test_cider_d_of_a_reference_is_high_and_unknown_images_are_refused():
    scorer = CiderD({1: ["a red dog on a bike", "a dog riding a red bike"], 2: ["two men in a park"]})
    assert scorer.score(1, "a red dog on a bike") > scorer.score(1, "two men in a park") > -1e-12
    with pytest.raises(InputError, match="image 3 has no references"):
        scorer.score(3, "a dog")


CAPTIONS = [
    "A man's dog, riding a hot-dog stand... don't!",
    "Two dogs (in a park).",
    'It\'s a cat\'s toy; "quoted" text -- ok',
    "A 3.5 inch pipe, $5 & 10% off",
    "He can't won't isn't",
    "cats' toys",
    "e-mail at 5:30 p.m.",
    "U.S. flag",
    "a  red\tcircle",
    "1,000 birds [flying] {x}",
    "a cat/dog toy",
    *TOKENIZER_TEXTS[:6],
    # quotes and contractions
    "'stop' sign", "a ‘curly’ and “double” quote", "I'm gonna go, I wanna go, we gotta go", "He cannot see",
    "lemme see, gimme that", "'tis 'twas", "rock 'n' roll at o'clock, y'all", "it’s don’t", "DON'T CAN'T",
    "the '90s", "O'Neil and D'Angelo", "ol' somethin' 'em 'cause c'mon",
    # abbreviations and acronyms
    "Mt. Everest", "Dr. Smith and Mrs. Jones", "St. Louis, Mo. in Jan. 5th", "a dog etc. and cats", "etc.",
    "Inc. Co. Ltd. Corp.", "Jr. Sr. Ph.D. a.k.a. vs. no. 5 fig. 3", "i.e. e.g. U.K. a.m. A.M.",
    "the U.S. The flag", "non-U.S. troops",
    # emails, URLs, handles, files
    "mail a@b.com or first.last@mail.example.org", "see http://example.com/a?b=c now", "visit www.example.com",
    "shop.com/items today", "@user #hashtag", "photo.jpg and notes.txt",
    # numbers, hyphens, symbols, brackets
    "3/4 cup, 5 1/2 feet, 24/7", "1990s 10th 1st 12/25/2014", "call 555-1234 or (555) 555-1234", "$5.00 US$ #1 50%",
    "AT&T C++ c# S&P-500", "a 2-year-old x-ray well-known", "a--b a - b a---b", "x*y a/b = c + d ~ e",
    "<b>bold</b> <angle>", "-LRB- pro- anti-", ":) ;-) ^_^", "wait... ok.. .... . . .",
    # non-ASCII
    "café crème, naïve résumé", "São Paulo, Zürich, Москва, 東京", "a—b a–b a…b", "½ ² ° × € £ ¢ ¥", "a dog 🐶 here",
    "«quoted» ‹single›",
]  # fmt: skip


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_normalization_equals_the_ptb_tokenizer():
    # An empty caption after each: the Java lexer reads the captions as one text and looks ahead across lines.
    captions = {(row, part): [text] for row, caption in enumerate(CAPTIONS) for part, text in enumerate((caption, ""))}
    tokenized = ptb_tokenize(captions)
    expected = [tokenized[row, 0][0] for row in range(len(CAPTIONS))]
    assert [normalize_caption(caption) for caption in CAPTIONS] == expected


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_known_difference_the_next_caption_decides_a_last_abbreviation():
    # ca. fig. no. ... keep their period only before a number, which for a caption's last word is the next
    # caption's first: Java tokenizes "fig." of one file differently from "fig" of another.
    tokenized = ptb_tokenize({0: ["see fig."], 1: ["5 dogs"], 2: ["see fig."], 3: ["dogs"]})
    assert (tokenized[0][0], tokenized[2][0]) == ("see fig.", "see fig")
    assert normalize_caption("see fig.") == "see fig"  # as if an empty line followed


def test_mean_of_others_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert torch.equal(mean_of_others(rewards), torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))
    with pytest.raises(InputError, match="at least 2"):
        mean_of_others(torch.ones(4, 1))


def test_loss_is_the_mean_advantage_weighted_log_probability_of_sampled_tokens():
    log_probs = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # 3 sampled tokens; padding does not count
    advantages = torch.tensor([2.0, -1.0])
    expected = -(2.0 * (-1.0 - 2.0) + -1.0 * -0.5) / 3
    assert policy_gradient_loss(log_probs, mask, advantages).item() == pytest.approx(expected)


def test_a_sample_above_the_baseline_gains_probability_after_one_sgd_step(tiny_gpt2_dir):
    torch.manual_seed(0)
    config = CaptionerConfig(feature_dim=8, prefix_length=2, lm_name=str(tiny_gpt2_dir))
    model = build_captioner(config, load_lm(str(tiny_gpt2_dir))).eval()
    features = torch.randn(1, 8).repeat(2, 1)
    tokens = torch.tensor([[5, 9, 0], [17, 3, 0]])  # two samples of one image, the last token is EOS
    mask = torch.ones_like(tokens)
    advantages = torch.tensor([1.0, -1.0])  # the first beat the baseline, the second did not

    def sequence_log_probs() -> torch.Tensor:
        with torch.no_grad():
            return token_log_probs(model, features, tokens, mask).sum(dim=1)

    before = sequence_log_probs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    policy_gradient_loss(token_log_probs(model, features, tokens, mask), mask, advantages).backward()
    optimizer.step()
    after = sequence_log_probs()
    assert after[0] > before[0] and after[1] < before[1]


def test_clip_s_by_hand(tmp_path):
    clip_dir = save_tiny_clip_model(tmp_path / "clip", TOKENIZER_TEXTS)
    scorer = ClipScorer(str(clip_dir))
    images = torch.randn(3, scorer.model.config.projection_dim, generator=torch.Generator().manual_seed(0))
    captions = ["a small red circle", "two green triangles", "word " * 200]  # the last is cut at 77 tokens
    clip_s, ref_clip_s = scorer.scores(images, captions, [["a red circle"], ["two triangles", "green"], ["a"]])
    texts = scorer.text_embeddings(["A photo depicts " + caption for caption in captions])
    cosines = (F.normalize(images, dim=-1) * texts).sum(dim=-1)
    torch.testing.assert_close(clip_s, 2.5 * cosines.clamp(min=0))
    reference_best = torch.stack(
        [
            (scorer.text_embeddings(group) @ texts[row]).max().clamp(min=0)
            for row, group in enumerate([["a red circle"], ["two triangles", "green"], ["a"]])
        ]
    )
    expected = torch.where(
        clip_s + reference_best > 0, 2 * clip_s * reference_best / (clip_s + reference_best), torch.zeros(3)
    )
    torch.testing.assert_close(ref_clip_s, expected)
    assert (clip_s >= 0).all() and (clip_s <= 2.5).all()


def test_a_clip_model_without_a_text_tower_is_one_line(tiny_clip_dir):
    with pytest.raises(InputError, match="needs a whole CLIP model with a text tower"):
        ClipScorer(str(tiny_clip_dir))


def test_cider_d_of_captions_sharing_no_ngram_is_zero():
    scorer = CiderD({1: ["a red dog"], 2: ["two men"]})
    assert scorer.scores([1, 2, 1], ["blue cat", "", "green"]) == [0.0, 0.0, 0.0]


def training_file(references: list[list[str]], embeddings: torch.Tensor, meta: dict | None = None) -> FeatureFile:
    """A feature file of one row per image (image ids 0, 1, ...) with these references."""
    captions = [{"image_id": row, "caption": c, "clip_embedding": row} for row, cs in enumerate(references) for c in cs]
    return FeatureFile(embeddings, captions, meta or {})


def test_each_reward_adds_up_its_terms_with_clip_weight_in_cider_plus_clip_only(tmp_path):
    scorer = ClipScorer(str(save_tiny_clip_model(tmp_path / "clip", TOKENIZER_TEXTS)))
    references = [["a red dog on a bike", "a dog riding a red bike"], ["two men in a park", "men in a park"], ["a cat"]]
    embeddings = torch.randn(3, scorer.model.config.projection_dim, generator=torch.Generator().manual_seed(0))
    encoder = {"family": "clip", "name": scorer.name, "feature_type": "image_embeds"}  # --data holds its image_embeds
    train_file = training_file(references, embeddings, {"encoder": encoder})
    image_ids, captions = [0, 1, 2, 0], ["a red dog on a bike", "two men", "a small red circle", "a cat"]
    cider = torch.tensor(CiderD(dict(enumerate(references))).scores(image_ids, captions), dtype=torch.float32)
    clip_s = scorer.clip_s(embeddings[image_ids], captions)

    def reward(name: str) -> torch.Tensor:
        return RewardScorer(name, train_file, "train.pkl", clip_model=scorer.name, clip_weight=0.5)(image_ids, captions)

    assert set(REWARDS) == {"cider", "clip", "cider+clip"}
    assert set(REWARD_TERMS) == {"cider", "clip", "clip_image", "clip_agg"}  # the last two: --unpaired's
    torch.testing.assert_close(reward("cider"), cider)
    torch.testing.assert_close(reward("clip"), clip_s)  # weight 1: --clip_weight is cider+clip's
    torch.testing.assert_close(reward("cider+clip"), cider + 0.5 * clip_s)
    assert cider.min() == 0 < cider.max() and (clip_s > 0).any()  # both terms count


class CaptionLength:
    """A reward term: the caption's number of words."""

    def __init__(self, inputs):
        """It needs none of the inputs."""

    def __call__(self, image_ids, captions) -> torch.Tensor:
        return torch.tensor([float(len(caption.split())) for caption in captions])


def test_a_new_reward_is_a_term_and_a_line_in_each_table(monkeypatch):
    monkeypatch.setitem(REWARD_TERMS, "length", CaptionLength)
    monkeypatch.setitem(REWARDS, "cider+length", {"cider": 1.0, "length": 0.25})
    references = [["a red dog on a bike"], ["two men in a park"]]
    image_ids, captions = [0, 1], ["a red dog", "two men in a park"]
    scorer = RewardScorer("cider+length", training_file(references, torch.zeros(2, 4)), "train.pkl")
    rewards = scorer(image_ids, captions)
    cider = CiderD(dict(enumerate(references))).scores(image_ids, captions)
    torch.testing.assert_close(rewards, torch.tensor(cider, dtype=torch.float32) + 0.25 * torch.tensor([3.0, 5.0]))
