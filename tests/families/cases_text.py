"""Contract cases of the text families beyond BERT / RoBERTa / DistilBERT (registered into `cases.CASES`)."""
from __future__ import annotations
