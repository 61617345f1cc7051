"""Plain-text readers for the real data the text benchmarks and the bundled language model use:
SST-2 ``.tsv`` files and the Pang & Lee polarity v2.0 reviews (``pang_lee_polarity_v2.zip``).

Both are already lower-cased and tokenised with spaces (``it 's a charming and often affecting
journey .``). Read from ``relprop.text.rationales.default_data_dir()`` or a user-given path.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

# "movie_reviews/pos/cv123_4567.txt": cv000-cv999 per polarity
_REVIEW_RE = re.compile(r"movie_reviews/(?P<pol>pos|neg)/cv(?P<num>\d{3})_\d+\.txt$")


def read_sst2(path: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and labels of an SST-2 ``sentence<TAB>label`` file with a header line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if line.strip()]
    return [s.strip() for s, _ in rows], [int(y) for _, y in rows]


def read_polarity_reviews(zip_path: str | Path, numbers: range = range(1000)) -> list[tuple[str, str]]:
    """``(file name, text)`` of the polarity v2.0 reviews whose number ``cvNNN`` is in ``numbers``
    (both polarities), sorted by name; each review's lines joined by single spaces."""
    reviews = []
    with zipfile.ZipFile(zip_path) as archive:
        for name in sorted(archive.namelist()):
            match = _REVIEW_RE.search(name)
            if match and int(match["num"]) in numbers:
                text = archive.read(name).decode("utf-8", errors="replace")
                reviews.append((name, " ".join(line.strip() for line in text.splitlines() if line.strip())))
    if not reviews:
        raise ValueError(f"{zip_path} holds no movie_reviews/{{pos,neg}}/cvNNN_*.txt files numbered in {numbers}")
    return reviews
