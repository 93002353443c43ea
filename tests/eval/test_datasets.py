"""Per-dataset synthesis settings: what each dataset's answers should look like."""
from __future__ import annotations

from ragserve.config import Config, SynthesisConfig
from ragserve.eval.datasets import apply_dataset_settings, get_spec


def test_qmsum_asks_for_multi_line_summaries_and_squad_for_short_answers():
    qmsum = apply_dataset_settings(Config(), get_spec("qmsum"), "eval-qmsum").synthesis
    assert (qmsum.answer_style, qmsum.answer_stop, qmsum.answer_tokens) == ("summary", (), 160)
    squad = apply_dataset_settings(Config(), get_spec("squad"), "eval-squad").synthesis
    assert (squad.answer_style, squad.answer_stop, squad.answer_tokens) == ("short", ("\n",), 32)


def test_an_explicit_config_wins_over_the_dataset():
    mine = Config(synthesis=SynthesisConfig(answer_tokens=48, answer_style="summary"))
    syn = apply_dataset_settings(mine, get_spec("squad"), "eval-squad").synthesis
    assert (syn.answer_style, syn.answer_tokens) == ("summary", 48)
