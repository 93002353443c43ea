"""Answer metrics against hand-computed cases."""
from __future__ import annotations

import pytest

from ragserve.eval.datasets import get_spec, score
from ragserve.metrics import (best_em, best_f1, best_numeric_match, best_rouge_l, exact_match, extract_numbers,
                              numeric_match, rouge_l, token_f1)


def test_token_f1_by_hand():
    # normalized: pred [cat, sat, on, mat], gold [cat, on, mat]: common 3, P 3/4, R 1
    assert token_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # repeated tokens count up to their multiplicity: pred [a1, a1, b], gold [a1, b]: common 2, P 2/3, R 1
    assert token_f1("a1 a1 b", "a1 b") == pytest.approx(0.8)


def test_exact_match_normalizes():
    assert exact_match("The Eiffel Tower!", "eiffel  tower") == 1.0
    assert exact_match("Eiffel Tower, Paris", "Eiffel Tower") == 0.0
    assert best_em("tower", ["Eiffel Tower", "The tower"]) == 1.0
    assert best_f1("tower", ["Eiffel Tower", "bridge"]) == pytest.approx(2 / 3)


def test_rouge_l_by_hand():
    # pred [cat, sat, on, mat], gold [cat, was, on, mat]: LCS [cat, on, mat] = 3, P = R = 3/4
    assert rouge_l("the cat sat on the mat", "the cat was on a mat") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for F1: LCS of [mat, on, cat] and [cat, on, mat] is 1
    assert rouge_l("mat on cat", "cat on mat") == pytest.approx(1 / 3)
    assert token_f1("mat on cat", "cat on mat") == 1.0
    # pred [a, b, c, d, e] (after dropping articles: "a" is an article) -> [b, c, d, e]
    # gold [b, x, d] : LCS [b, d] = 2, P 2/4, R 2/3 -> F 2*(1/2)(2/3)/(7/6) = 4/7
    assert rouge_l("b c d e", "b x d") == pytest.approx(4 / 7)
    assert rouge_l("", "") == 1.0 and rouge_l("words", "") == 0.0
    assert best_rouge_l("cat on mat", ["dog", "cat on the mat"]) == 1.0


@pytest.mark.parametrize("pred, gold, expected", [
    ("Total current assets were $16,525 million.", "$16525.00", 1.0),     # thousands separators
    ("About $16.5 billion", "$16525.00", 1.0),                            # scale word vs "USD millions"
    ("16.6 billion", "$16525.00", 1.0),                                   # 16,600 vs 16,525: 0.45% off
    ("17 billion", "$16525.00", 0.0),                                     # 2.9% off
    ("0.2426", "24.26%", 1.0),                                            # percent as a fraction
    ("24.3 percent", "24.26%", 1.0),                                      # within 1%
    ("22%", "24.26%", 0.0),
    ("In FY2022 the ratio was 0.96.", "The quick ratio in FY2022 was 0.96", 1.0),   # years ignored
    ("In FY2022 the ratio was 0.90.", "The quick ratio in FY2022 was 0.96", 0.0),
    ("960", "0.96", 0.0),                                                 # no scale word, no rescaling
    ("a loss of (3.5) million", "-3.5 million", 1.0),                     # sign ignored
    ("it grew from 5.1% to 6.0%", "5.1% and 6.0%", 1.0),                  # every gold number needed
    ("it grew to 6.0%", "5.1% and 6.0%", 0.0),
])
def test_numeric_match_cases(pred, gold, expected):
    assert numeric_match(pred, gold) == expected


def test_numeric_match_without_gold_numbers_is_none():
    assert numeric_match("Yes, it did.", "Yes") is None
    assert best_numeric_match("Yes", ["Yes", "no"]) is None
    assert best_numeric_match("12", ["Yes", "12.0"]) == 1.0


def test_extract_numbers_units():
    nums = extract_numbers("$1,577.00, 3.2bn, 12%, 2019")
    assert [n.value for n in nums] == [1577.0, 3.2e9, 12.0, 2019.0]
    assert [n.percent for n in nums] == [False, False, True, False]
    assert [n.is_year for n in nums] == [False, False, False, True]


def test_score_picks_the_primary_metric_per_dataset():
    assert score(get_spec("squad"), "Paris", ["Paris"])["quality"] == 1.0
    qm = score(get_spec("qmsum"), "mat on cat", ["cat on mat"])
    assert qm["quality"] == qm["rouge_l"] == pytest.approx(1 / 3) and qm["f1"] == 1.0
    fb = get_spec("financebench")
    assert score(fb, "about $16.5 billion", ["$16525.00"])["quality"] == 1.0      # numeric
    text = score(fb, "Yes, it did", ["Yes"])
    assert text["numeric"] is None and text["quality"] == text["f1"]
