"""Text classifiers: explanations of raw text, word by word, and human-rationale data."""
from .explain import TextExplanation, Word, explain_text
from .generate import GenerationExplanation, explain_generation

__all__ = ["GenerationExplanation", "TextExplanation", "Word", "explain_generation", "explain_text"]
