import io
import json
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from relprop.text.rationales import (
    QUERY,
    convert_zaidan,
    default_data_dir,
    heuristic_sentence_lengths,
    load_eraser,
    parse_tagged,
)

# Zaidan-style reviews: tags spaced out or glued to words, nested tags, a review of the
# annotated series without rationale (like posR_161), an unannotated one, a non-review member.
REVIEWS = {
    "withRats_pos/posR_000.txt": "a <POS> truly great </POS> film . i <POS>loved it</POS> ! the end\n",
    "withRats_pos/posR_161.txt": "no tags here .\n",
    "withRats_neg/negR_750.txt": '<NEG> bad <NEG> very bad </NEG> </NEG> movie . . . " boring . " yes\n',
    "withRats_pos/pos_900.txt": "fine film .\n",
    "withRats_pos/README": "not a review",
}
# Polarity v2.0 copy of negR_750 with its own line breaks (the heuristic would not split it).
PANG_LEE = {"movie_reviews/neg/cv750_1.txt": 'bad very bad movie . . . \n" boring . " \nyes \n'}


def _write_tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _write_zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def converted(tmp_path):
    archive = _write_tar(tmp_path / "z.tar.gz", REVIEWS)
    pang_lee = _write_zip(tmp_path / "pl.zip", PANG_LEE)
    out = tmp_path / "movies"
    return out, convert_zaidan(out, archive, pang_lee_zip=pang_lee)


def test_docs_are_untagged_one_sentence_per_line(converted):
    out, report = converted
    assert sorted(p.name for p in (out / "docs").iterdir()) == [
        "negR_750.txt", "posR_000.txt", "posR_161.txt", "pos_900.txt"]
    # heuristic split after "." and "!"
    assert (out / "docs" / "posR_000.txt").read_text() == "a truly great film .\ni loved it !\nthe end\n"
    # line breaks taken from the polarity v2.0 copy
    assert (out / "docs" / "negR_750.txt").read_text() == 'bad very bad movie . . .\n" boring . "\nyes\n'
    assert report.pang_lee_sentences == 1
    assert report.annotated_without_rationale == ["posR_161.txt"]
    assert report.rationale_spans == 3
    assert dict(report.split_sizes) == {"train": 2, "val": 1, "unannotated": 1}


def test_annotations_have_exact_offsets(converted):
    out, _ = converted
    train = _jsonl(out / "train.jsonl")
    assert [a["annotation_id"] for a in train] == ["posR_000.txt", "posR_161.txt"]
    # tokens of posR_000: a(0) truly(1) great(2) film(3) .(4) | i(5) loved(6) it(7) !(8) | the(9) end(10)
    assert train[0] == {
        "annotation_id": "posR_000.txt",
        "classification": "POS",
        "evidences": [
            [{"docid": "posR_000.txt", "start_token": 1, "end_token": 3,
              "start_sentence": 0, "end_sentence": 1, "text": "truly great"}],
            [{"docid": "posR_000.txt", "start_token": 6, "end_token": 8,
              "start_sentence": 1, "end_sentence": 2, "text": "loved it"}],
        ],
        "query": QUERY,
        "query_type": None,
    }
    assert train[1]["evidences"] == []
    # nested tags merge into the outer span: bad(0) very(1) bad(2)
    (val,) = _jsonl(out / "val.jsonl")
    assert val["classification"] == "NEG"
    assert val["evidences"] == [[{"docid": "negR_750.txt", "start_token": 0, "end_token": 3,
                                  "start_sentence": 0, "end_sentence": 1, "text": "bad very bad"}]]
    assert _jsonl(out / "test.jsonl") == []
    (unannotated,) = _jsonl(out / "unannotated.jsonl")
    assert unannotated["annotation_id"] == "pos_900.txt" and unannotated["evidences"] == []


def test_load_converted_roundtrip(converted):
    out, _ = converted
    examples = {e.docid: e for e in load_eraser(out, "train")}
    ex = examples["posR_000.txt"]
    assert ex.tokens == "a truly great film . i loved it ! the end".split()
    assert ex.label == "POS"
    assert ex.rationale_positions == {1, 2, 6, 7}
    assert ex.rationale.dtype == bool and len(ex.rationale) == len(ex.tokens)
    assert not examples["posR_161.txt"].rationale.any()


@pytest.mark.parametrize("text, message", [
    ("a </POS> b", "without an open one"),
    ("a <POS> b", "never closed"),
    ("a <NEG> b </NEG>", "polarity"),
])
def test_parse_tagged_reports_bad_tags(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tagged(text, "POS", source="x.txt")


def test_parse_tagged_skips_empty_span():
    assert parse_tagged("a <POS> </POS> b", "POS") == (["a", "b"], [])


def test_heuristic_sentences_keep_ellipses_together():
    assert heuristic_sentence_lengths("wait . . . what ? ok".split()) == [4, 2, 1]


def _genuine_folder(tmp_path: Path, docs_as_jsonl: bool) -> Path:
    # Genuine ERASER: sentences per line, stray spaces and blank lines tolerated.
    doc = "the plot is thin . \n\nbut the acting is superb .\n"
    annotation = {
        "annotation_id": "posR_004.txt", "classification": "POS", "query": QUERY, "query_type": None,
        "evidences": [
            [{"docid": "posR_004.txt", "start_token": 8, "end_token": 10, "start_sentence": 1,
              "end_sentence": 2, "text": "is superb"}],
            [{"docid": "posR_004.txt", "start_token": 5, "end_token": 7, "start_sentence": 1,
              "end_sentence": 2, "text": "but the"}],
        ],
    }
    if docs_as_jsonl:
        (tmp_path / "docs.jsonl").write_text(json.dumps({"docid": "posR_004.txt", "document": doc}) + "\n")
    else:
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "posR_004.txt").write_text(doc)
    (tmp_path / "test.jsonl").write_text(json.dumps(annotation) + "\n")
    return tmp_path


@pytest.mark.parametrize("docs_as_jsonl", [False, True])
def test_load_genuine_eraser(tmp_path, docs_as_jsonl):
    folder = _genuine_folder(tmp_path, docs_as_jsonl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ex,) = load_eraser(folder, "test")
    assert ex.docid == "posR_004.txt" and ex.label == "POS"
    assert ex.tokens == "the plot is thin . but the acting is superb .".split()
    np.testing.assert_array_equal(ex.rationale, [0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0])


def test_load_eraser_flags_bad_evidence(tmp_path):
    folder = _genuine_folder(tmp_path, docs_as_jsonl=False)
    annotation = json.loads((folder / "test.jsonl").read_text())
    annotation["evidences"][0][0]["text"] = "was superb"
    (folder / "test.jsonl").write_text(json.dumps(annotation) + "\n")
    with pytest.warns(UserWarning, match="1 evidence texts"):
        list(load_eraser(folder, "test"))
    annotation["evidences"][0][0]["end_token"] = 99
    (folder / "test.jsonl").write_text(json.dumps(annotation) + "\n")
    with pytest.raises(ValueError, match="outside a document of 11 tokens"):
        list(load_eraser(folder, "test"))


MOVIES = default_data_dir() / "movies"


@pytest.mark.skipif(not (MOVIES / "zaidan_rationales.tar.gz").exists(),
                    reason=f"real Zaidan archive not found under {MOVIES} (set RELPROP_DATA)")
def test_real_zaidan_archive_converts(tmp_path):
    report = convert_zaidan(tmp_path)  # default data location, polarity v2.0 zip beside it
    assert dict(report.split_sizes) == {"train": 1400, "val": 200, "test": 200, "unannotated": 200}
    assert report.annotated_without_rationale == ["posR_161.txt"]
    assert report.rationale_spans == 7253 + 8144  # <POS> + <NEG> tags in the archive
    assert report.pang_lee_sentences == 1953  # the rest differ slightly from polarity v2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every evidence text matches its tokens
        test = list(load_eraser(tmp_path, "test"))
    assert len(test) == 200 and all(e.rationale.any() for e in test)
    assert {e.label for e in test} == {"POS", "NEG"}
