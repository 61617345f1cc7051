"""Human rationales for movie reviews in the ERASER format.

``convert_zaidan`` turns the Zaidan et al. (2007) archive, whose reviews carry inline
``<POS> ... </POS>`` / ``<NEG> ... </NEG>`` rationale tags, into an ERASER "movies"-style folder:
``docs/<docid>`` (tags removed, tokens joined by single spaces, one sentence per line) and one
``<split>.jsonl`` per split with an annotation per line. ``load_eraser`` reads that folder, or
genuine ERASER data, as documents with a boolean rationale mask over their tokens.

Split (by the 3-digit file number, identical for pos and neg):
    train 000-699 (1,400 reviews), val 700-799 (200), test 800-899 (200),
    unannotated 900-999 (200 reviews without rationales, ``evidences`` empty).
This is not ERASER's split: ERASER's test set holds 199 of the 900-999 reviews with
rationales its authors collected, which are not part of the Zaidan archive. posR_161 is the
only annotated-series review without any rationale; it stays in train with no evidences.

The Zaidan files hold each review on one line. ERASER's documents keep the sentence-per-line
layout of Pang & Lee's polarity v2.0 corpus, so when that zip is available, a review whose
tokens equal a v2.0 review (1,953 of 2,000) takes its line breaks; the others use a
punctuation heuristic.
Sentences only affect ``start_sentence``/``end_sentence``; token offsets are document-level.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

QUERY = "What is the sentiment of this review?"
LABEL_IDS = {"NEG": 0, "POS": 1}
SPLITS = (("train", 700), ("val", 800), ("test", 900), ("unannotated", 1000))
FILE_RE = re.compile(r"(?P<pol>pos|neg)(?P<annotated>R?)_(?P<num>\d{3})\.txt")
TAG_RE = re.compile(r"</?(?:POS|NEG)>")
TAGS = {"<POS>", "</POS>", "<NEG>", "</NEG>"}
SENTENCE_END = {".", "!", "?"}
# A sentence-final mark followed by one of these continues the sentence (". . .", '. "').
SENTENCE_CONTINUES = SENTENCE_END | {'"', "'", ")"}


def default_data_dir() -> Path:
    """``$RELPROP_DATA`` if set, else ``../shared/data`` next to the repository root."""
    env = os.environ.get("RELPROP_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass(frozen=True)
class TaggedReview:
    docid: str  # ERASER keeps the file name, e.g. "posR_000.txt"
    label: str  # "POS" | "NEG", from the file name
    tokens: list[str]
    spans: list[tuple[int, int]]  # rationale token spans, end exclusive


def split_of(docid: str) -> str:
    number = int(_match_name(docid)["num"])
    return next(name for name, bound in SPLITS if number < bound)


def _match_name(docid: str) -> re.Match:
    match = FILE_RE.fullmatch(docid)
    if match is None:
        raise ValueError(f"not a Zaidan review file name: {docid!r}")
    return match


def parse_tagged(text: str, label: str, source: str = "") -> tuple[list[str], list[tuple[int, int]]]:
    """Tokens (split on whitespace, tags removed) and rationale spans of one tagged review.

    Tags may be glued to words ("<POS>great"); nested tags merge into the outermost span;
    unbalanced tags or tags of the other polarity raise ``ValueError`` naming ``source``.
    """
    tokens: list[str] = []
    spans: list[tuple[int, int]] = []
    depth, start = 0, 0
    for piece in TAG_RE.sub(lambda m: f" {m.group()} ", text).split():
        if piece not in TAGS:
            tokens.append(piece)
            continue
        where = f"{source}: {piece} at token {len(tokens)}"
        if piece.strip("</>") != label:
            raise ValueError(f"{where}: tag polarity differs from the review label {label}")
        if piece.startswith("</"):
            if depth == 0:
                raise ValueError(f"{where}: closing tag without an open one")
            depth -= 1
            if depth == 0 and len(tokens) > start:  # skip empty "<POS> </POS>"
                spans.append((start, len(tokens)))
        else:
            if depth == 0:
                start = len(tokens)
            depth += 1
    if depth:
        raise ValueError(f"{source}: {depth} rationale tag(s) never closed")
    return tokens, spans


def read_zaidan(archive: Path) -> Iterator[TaggedReview]:
    """Reviews of the Zaidan tar.gz in file-name order; other members are ignored."""
    texts: dict[str, str] = {}
    with tarfile.open(archive) as tar:
        for member in tar:  # in stream order: seeking back in a .gz re-decompresses
            handle = tar.extractfile(member) if member.isfile() else None    # None: not a regular file
            if handle is not None and FILE_RE.fullmatch(Path(member.name).name):
                texts[member.name] = handle.read().decode("utf-8")
    for name in sorted(texts, key=lambda n: Path(n).name):
        docid = Path(name).name
        label = _match_name(docid)["pol"].upper()
        tokens, spans = parse_tagged(texts[name], label, source=name)
        yield TaggedReview(docid, label, tokens, spans)


def pang_lee_sentence_lengths(zip_path: Path) -> dict[tuple[str, ...], list[int]]:
    """Maps each polarity-v2.0 review's token sequence to its sentence (= line) lengths."""
    index: dict[tuple[str, ...], list[int]] = {}
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            if not re.search(r"/(pos|neg)/[^/]+\.txt$", name):
                continue
            text = archive.read(name).decode("utf-8")
            lengths = [len(line.split()) for line in text.splitlines()]
            index[tuple(text.split())] = [n for n in lengths if n]
    return index


def heuristic_sentence_lengths(tokens: list[str]) -> list[int]:
    lengths, start = [], 0
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if token in SENTENCE_END and following not in SENTENCE_CONTINUES:
            lengths.append(i + 1 - start)
            start = i + 1
    if start < len(tokens):
        lengths.append(len(tokens) - start)
    return lengths


def _evidence(docid: str, tokens: list[str], span: tuple[int, int], sentence_of: list[int]) -> dict:
    start, end = span
    return {
        "docid": docid,
        "start_token": start,
        "end_token": end,
        "start_sentence": sentence_of[start],
        "end_sentence": sentence_of[end - 1] + 1,  # exclusive, like end_token
        "text": " ".join(tokens[start:end]),
    }


@dataclass
class ConversionReport:
    split_sizes: Counter = field(default_factory=Counter)
    annotated_without_rationale: list[str] = field(default_factory=list)
    rationale_spans: int = 0
    pang_lee_sentences: int = 0  # reviews whose line breaks came from polarity v2.0


def convert_zaidan(
    out_dir: Path,
    archive: Path | None = None,
    pang_lee_zip: Path | None = None,
) -> ConversionReport:
    """Write the ERASER-format folder for ``archive`` into ``out_dir``; see the module doc.

    ``archive`` defaults to ``<default_data_dir()>/movies/zaidan_rationales.tar.gz``;
    ``pang_lee_zip`` (sentence breaks only) to ``pang_lee_polarity_v2.zip`` beside the
    archive, if present.
    """
    archive = Path(archive) if archive else default_data_dir() / "movies" / "zaidan_rationales.tar.gz"
    pang_lee_zip = Path(pang_lee_zip) if pang_lee_zip else archive.parent / "pang_lee_polarity_v2.zip"
    known = pang_lee_sentence_lengths(pang_lee_zip) if pang_lee_zip.exists() else {}
    out_dir = Path(out_dir)
    (out_dir / "docs").mkdir(parents=True, exist_ok=True)
    report = ConversionReport()
    annotations: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for review in read_zaidan(archive):
        lengths = known.get(tuple(review.tokens))
        report.pang_lee_sentences += lengths is not None
        lengths = lengths or heuristic_sentence_lengths(review.tokens)
        sentence_of = [s for s, n in enumerate(lengths) for _ in range(n)]
        lines, offset = [], 0
        for n in lengths:
            lines.append(" ".join(review.tokens[offset:offset + n]))
            offset += n
        (out_dir / "docs" / review.docid).write_text("\n".join(lines) + "\n")
        if _match_name(review.docid)["annotated"] and not review.spans:
            report.annotated_without_rationale.append(review.docid)
        report.rationale_spans += len(review.spans)
        split = split_of(review.docid)
        report.split_sizes[split] += 1
        annotations[split].append({
            "annotation_id": review.docid,
            "classification": review.label,
            "evidences": [[_evidence(review.docid, review.tokens, s, sentence_of)] for s in review.spans],
            "query": QUERY,
            "query_type": None,
        })
    for split, rows in annotations.items():
        with open(out_dir / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
    return report


@dataclass(frozen=True)
class RationaleExample:
    docid: str
    tokens: list[str]
    label: str
    rationale: np.ndarray  # bool, one entry per token

    @property
    def rationale_positions(self) -> set[int]:
        return set(np.flatnonzero(self.rationale).tolist())


def _tokenize_doc(text: str) -> list[str]:
    # As ERASER's load_documents: lines stripped, blank lines dropped, split on single spaces.
    return [t for line in text.split("\n") if line.strip() for t in line.strip().split(" ") if t]


def _doc_reader(path: Path):
    if (path / "docs.jsonl").exists():  # the other layout ERASER allows
        with open(path / "docs.jsonl") as f:
            texts = {row["docid"]: row["document"] for row in map(json.loads, f)}
        return lambda docid: _tokenize_doc(texts[docid])
    return lambda docid: _tokenize_doc((path / "docs" / docid).read_text())


def _docid_of(annotation: Mapping) -> str:
    docids = {ev["docid"] for group in annotation["evidences"] for ev in group}
    docids |= set(annotation.get("docids") or ())
    if len(docids) > 1:
        raise ValueError(f"annotation {annotation['annotation_id']} spans several documents: {sorted(docids)}")
    return docids.pop() if docids else annotation["annotation_id"]


def load_eraser(path: Path, split: str) -> Iterator[RationaleExample]:
    """Single-document annotations of ``<path>/<split>.jsonl`` with their rationale masks.

    Works on genuine ERASER folders (``docs/`` or ``docs.jsonl``) and on ``convert_zaidan``
    output. Evidence ``text`` that differs from the tokens it points at is reported once.
    """
    path = Path(path)
    read_doc = _doc_reader(path)
    mismatches = []
    with open(path / f"{split}.jsonl") as f:
        for annotation in map(json.loads, f):
            docid = _docid_of(annotation)
            tokens = read_doc(docid)
            mask = np.zeros(len(tokens), dtype=bool)
            for ev in _evidences(annotation):
                if not 0 <= ev["start_token"] < ev["end_token"] <= len(tokens):
                    raise ValueError(f"{docid}: evidence tokens {ev['start_token']}:{ev['end_token']} "
                                     f"outside a document of {len(tokens)} tokens")
                mask[ev["start_token"]:ev["end_token"]] = True
                if "text" in ev and ev["text"].split() != tokens[ev["start_token"]:ev["end_token"]]:
                    mismatches.append(f"{docid}[{ev['start_token']}:{ev['end_token']}]")
            yield RationaleExample(docid, tokens, annotation["classification"], mask)
    if mismatches:
        warnings.warn(f"{len(mismatches)} evidence texts in {split}.jsonl differ from their "
                      f"document tokens, e.g. {mismatches[:3]}", stacklevel=2)


def _evidences(annotation: Mapping) -> Iterable[Mapping]:
    return (ev for group in annotation["evidences"] for ev in group)
