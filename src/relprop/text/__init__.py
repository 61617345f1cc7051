"""Text classifiers: explanations of raw text, word by word, and human-rationale data."""
from .explain import TextExplanation, Word, explain_text

__all__ = ["TextExplanation", "Word", "explain_text"]
