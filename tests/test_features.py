"""Feature files: our round trip, ClipCap's plain pickles, refusal of pickles that run code, atomic writes."""

import builtins
import os
import pickle

import numpy as np
import pytest
import torch

from data.errors import InputError
from data.features import FeatureFile, read_feature_file, write_feature_file


def sample_features() -> FeatureFile:
    embeddings = torch.randn(3, 8)
    captions = [
        {"image_id": image_id, "caption": f"caption {k}", "clip_embedding": row}
        for row, image_id in enumerate((5, 9, 2))
        for k in range(2)
    ]
    return FeatureFile(embeddings, captions, {"feature_dim": 8, "encoder": {"family": "clip"}})


def test_our_file_round_trips_exactly(tmp_path):
    features = sample_features()
    write_feature_file(tmp_path / "f.pkl", features)
    loaded = read_feature_file(tmp_path / "f.pkl")
    assert torch.equal(loaded.embeddings, features.embeddings)
    assert loaded.captions == features.captions and loaded.meta == features.meta
    assert loaded.image_rows() == {5: 0, 9: 1, 2: 2}


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_clipcap_plain_pickle_loads(tmp_path, as_numpy, protocol):
    """ClipCap's parse_coco.py: pickle.dump({"clip_embedding": torch.cat(...), "captions": ...}) with no meta."""
    embeddings = torch.randn(2, 4)
    captions = [
        {"image_id": 7, "caption": "a dog", "id": 1, "clip_embedding": 0},
        {"image_id": 8, "caption": "a cat", "id": 2, "clip_embedding": 1},
    ]
    with open(tmp_path / "clipcap.pkl", "wb") as handle:
        content = {"clip_embedding": embeddings.numpy() if as_numpy else embeddings, "captions": captions}
        pickle.dump(content, handle, protocol=protocol)
    loaded = read_feature_file(tmp_path / "clipcap.pkl")
    assert torch.equal(loaded.embeddings, embeddings) and loaded.captions == captions and loaded.meta == {}


class WritesAFile:
    """A pickle that, when loaded by plain pickle.load, creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


class RunsAShellCommand:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload_class", [WritesAFile, RunsAShellCommand])
def test_a_pickle_that_would_write_a_file_is_refused_and_writes_nothing(tmp_path, payload_class):
    control = tmp_path / "control.txt"  # the payload is real: what unpickling it would call, writes the file
    function, arguments = payload_class(control).__reduce__()
    result = function(*arguments)
    if hasattr(result, "close"):
        result.close()
    assert control.exists()
    victim = tmp_path / "pwned.txt"
    malicious = tmp_path / "malicious.pkl"
    with open(malicious, "wb") as handle:
        pickle.dump({"clip_embedding": torch.zeros(1, 2), "captions": [payload_class(victim)]}, handle)
    with pytest.raises(
        InputError,
        match=r"malicious\.pkl: not a readable feature file: refuses to load '(io\.open|builtins\.open|posix\.system|os\.system)'",
    ) as error:
        read_feature_file(malicious)
    assert "\n" not in str(error.value)
    assert not victim.exists()


ONE_CAPTION = [{"image_id": 1, "caption": "x", "clip_embedding": 0}]


def _with_rows(embeddings, row) -> bytes:
    """A feature pickle of `embeddings` with one caption at `row` (protocol 2: numpy arrays go through _reconstruct)."""
    return pickle.dumps({"clip_embedding": embeddings, "captions": [{"image_id": 1, "caption": "x", "clip_embedding": row}]}, protocol=2)


class _ArrayClaiming:
    """Pickles as numpy pickles a (1, 3) array, but its state claims `shape` for the same 12 bytes."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def __reduce__(self):
        reconstruct, arguments, (version, _, dtype, fortran, data) = np.zeros((1, 3), np.float32).__reduce__()
        return reconstruct, arguments, (version, self.shape, dtype, fortran, data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable feature file"),
        (b"garbage that is not a pickle", "not a readable feature file"),
        (pickle.dumps([1, 2]), "expected a dict"),
        (
            pickle.dumps(
                {"clip_embedding": np.zeros((2, 3)), "captions": [{"image_id": 1, "caption": "x", "clip_embedding": 2}]}
            ),
            "row index 2, outside 0..1",
        ),
        (
            pickle.dumps({"clip_embedding": np.zeros((1, 3)), "captions": ONE_CAPTION, "meta": ["not", "a dict"]}),
            "'meta' must be a dict",
        ),
        (
            pickle.dumps({"clip_embedding": np.zeros((1, 3)), "captions": ONE_CAPTION, "meta": {"encoder": "ViT"}}),
            "its 'encoder' a dict",
        ),
        # _codecs.encode is let through for protocol 2's latin-1 bytes only.
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00utf-8\x86R.", "refuses _codecs.encode"),
        (_with_rows(np.zeros((2, 3)), -1), r"row index -1, outside 0\.\.1"),
        (_with_rows(np.zeros((2, 3)), True), "row index True"),
        (_with_rows(np.zeros((2, 3)), 1.0), "row index 1.0"),
        (_with_rows(np.zeros(3), 0), "must be a 2-D or 3-D real tensor"),
        (_with_rows(np.zeros((1, 1, 1, 3)), 0), "must be a 2-D or 3-D real tensor"),
        (_with_rows(np.array([["a", "b"]]), 0), "must be a 2-D or 3-D real tensor"),
        (_with_rows(np.zeros((1, 3), np.complex64), 0), "must be a 2-D or 3-D real tensor"),
        (_with_rows([[0.0, 1.0]], 0), "must be a 2-D or 3-D real tensor"),
        (_with_rows(np.full((2, 3), 1e300), 0), r"2 feature row\(s\) hold NaN or infinite values \(rows 0, 1\)"),
        (_with_rows(_ArrayClaiming((10**6, 10**6)), 0), "buffer size does not match array size"),
        (pickle.dumps({"clip_embedding": np.zeros((1, 3)), "captions": {"image_id": 1}}), "'captions' is empty or not a list"),
    ],
)
def test_bad_feature_files_are_one_line_input_errors(tmp_path, content, message):
    """Cases refused before the adversarial pass."""
    (tmp_path / "bad.pkl").write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        read_feature_file(tmp_path / "bad.pkl")
    assert "\n" not in str(caught.value)


class _EmptyArrayOfShape:
    """Pickles as numpy pickles an array, but asks _reconstruct for `shape` (numpy always asks for (0,))."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def __reduce__(self):
        reconstruct, (subtype, _, typecode), state = np.zeros((1, 3), np.float32).__reduce__()
        return reconstruct, (subtype, self.shape, typecode), state


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # 100 bytes asking numpy for a 4 TB array before its data arrives: numpy allocated it, or failed with a traceback.
        (_with_rows(_EmptyArrayOfShape((4 * 10**12,)), 0), "refuses numpy _reconstruct of a non-empty shape"),
        (_with_rows(np.zeros((1, 3), np.int64), 0), "'clip_embedding' holds int64 values, not floating-point features"),
        (_with_rows(torch.zeros(1, 3, dtype=torch.bool), 0), "'clip_embedding' holds bool values"),
        (_with_rows(torch.zeros(0, 3), 0), "'clip_embedding' has no rows"),
        (
            pickle.dumps({"clip_embedding": np.zeros((1, 3)), "captions": [{"image_id": [1], "caption": "x", "clip_embedding": 0}]}),
            "caption 0 needs an 'image_id' \\(a number or text\\)",
        ),
    ],
)
def test_lying_feature_files_are_one_line_input_errors(tmp_path, content, message):
    """Cases the adversarial pass found accepted, misnamed or crashing."""
    (tmp_path / "bad.pkl").write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        read_feature_file(tmp_path / "bad.pkl")
    assert "\n" not in str(caught.value)


def test_a_directory_is_not_a_feature_file(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}: cannot be read"):
        read_feature_file(tmp_path)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "features.pkl"
    write_feature_file(target, sample_features())
    before = target.read_bytes()

    def dump_half_then_fail(obj, handle, protocol=None):
        handle.write(pickle.dumps(obj)[:100])  # a partial file, as a killed or full-disk run leaves
        raise OSError("No space left on device")

    monkeypatch.setattr(pickle, "dump", dump_half_then_fail)
    with pytest.raises(InputError, match="features.pkl: cannot write .*the previous file is unchanged"):
        write_feature_file(target, sample_features())
    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["features.pkl"]
