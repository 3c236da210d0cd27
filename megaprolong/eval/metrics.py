"""Scores on a 0-100 scale: HELMET's substring exact match and RULER's recall."""

from __future__ import annotations

import re
import string


def normalize(text: str) -> str:
    """SQuAD-style normalization (lower case, no punctuation, no articles, single spaces), as HELMET uses."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def substring_exact_match(prediction: str, answers: list[str]) -> float:
    """100 if any gold answer appears in the prediction (both normalized), else 0."""
    pred = normalize(prediction)
    return 100.0 if any(normalize(a) in pred for a in answers) else 0.0


def recall(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the percentage of gold strings found in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return 100.0 * sum(a.lower() in pred for a in answers) / len(answers)


METRICS = {"substring_exact_match": substring_exact_match, "recall": recall}
