"""Answer-quality metrics (pure): SQuAD-normalized token F1 and exact match, ROUGE-L,
and a numeric match for financial answers (FinanceBench)."""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_f1(prediction: str, golds: Iterable[str]) -> float:
    return max((token_f1(prediction, g) for g in golds), default=0.0)


def best_em(prediction: str, golds: Iterable[str]) -> float:
    return max((exact_match(prediction, g) for g in golds), default=0.0)


# ---------------------------------------------------------------------------- ROUGE-L

def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)*len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F1 (beta = 1) on SQuAD-normalized tokens: LCS / len, as rouge-score's
    `rougeL` computes it (without stemming, on our normalization)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_rouge_l(prediction: str, golds: Iterable[str]) -> float:
    return max((rouge_l(prediction, g) for g in golds), default=0.0)


# ---------------------------------------------------------------------------- numeric match
#
# FinanceBench answers are mostly numbers ("$1577.00", "24.26%", "0.96") inside free text.
# numeric_match extracts the numbers of the gold answer and of the prediction and says
# whether every gold number is matched by some predicted number:
#   - values match within `rel_tol` (1%) relative to the gold value;
#   - signs are ignored ("-5%" vs "decreased by 5%"; "(123)" is accounting for -123);
#   - a scale word after a number multiplies it (thousand/k, million/mn/m, billion/bn/b,
#     trillion/tn), and the two sides may still differ by a power of 1000: a question
#     that says "answer in USD millions" has gold 16525 where a model may write
#     "$16.5 billion" (only when one side has a scale word: 0.96 never matches 960);
#   - percent: 24.26% matches 24.26 and 0.2426;
#   - years (integers 1900-2100 written without $, % or decimals) are ignored when the
#     gold has other numbers: "in FY2022 the ratio was 0.96" is about 0.96.
# It returns None when the gold holds no number (then the answer is text: use F1/ROUGE-L).

_NUMBER = re.compile(
    r"(?P<neg>-|\()?\s*(?P<cur>[$€£])?\s*(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"\)?\s*(?P<pct>%|percent\b)?\s*(?P<scale>(?:thousand|million|billion|trillion|mn|bn|tn|k|m|b)\b)?",
    re.IGNORECASE)
_SCALES = {"thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "m": 1e6,
           "billion": 1e9, "bn": 1e9, "b": 1e9, "trillion": 1e12, "tn": 1e12}


@dataclass(frozen=True)
class Number:
    """A number found in text, with what its writing says about it."""

    value: float          # absolute value after the scale word
    percent: bool = False
    is_year: bool = False
    scaled: bool = False  # written with a scale word (million, bn, ...)


def extract_numbers(text: str) -> list[Number]:
    out: list[Number] = []
    for m in _NUMBER.finditer(text):
        raw = m.group("num").replace(",", "")
        value = abs(float(raw))
        scale = (m.group("scale") or "").lower()
        value *= _SCALES.get(scale, 1.0)
        pct = bool(m.group("pct"))
        year = (not pct and not m.group("cur") and not scale and "." not in raw
                and 1900 <= value <= 2100)
        out.append(Number(value, pct, year, bool(scale)))
    return out


def _close(a: float, b: float, rel_tol: float) -> bool:
    return abs(a - b) <= rel_tol * abs(b) if b else abs(a) <= 1e-9


def _number_matches(pred: Number, gold: Number, rel_tol: float) -> bool:
    factors = [1e-9, 1e-6, 1e-3, 1.0, 1e3, 1e6, 1e9] if pred.scaled or gold.scaled else [1.0]
    if pred.percent or gold.percent:
        factors += [1e2, 1e-2]
    return any(_close(pred.value * f, gold.value, rel_tol) for f in factors)


def numeric_match(prediction: str, gold: str, rel_tol: float = 0.01) -> float | None:
    """1.0 when every number of `gold` appears in `prediction` (rules above), 0.0 when one
    does not, None when `gold` has no number."""
    gold_numbers = extract_numbers(gold)
    if not gold_numbers:
        return None
    wanted = [n for n in gold_numbers if not n.is_year] or gold_numbers
    found = extract_numbers(prediction)
    return float(all(any(_number_matches(p, g, rel_tol) for p in found) for g in wanted))


def best_numeric_match(prediction: str, golds: Iterable[str]) -> float | None:
    scores = [s for s in (numeric_match(prediction, g) for g in golds) if s is not None]
    return max(scores) if scores else None
