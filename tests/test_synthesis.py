"""Synthesis programs driven with canned results: call structure, fan-out, answer choice."""
from __future__ import annotations

import pytest

from ragserve.config import SynthesisConfig
from ragserve.errors import ConfigError
from ragserve.domain import Chunk, LLMResult, Method, RagPlan
from ragserve.synthesis import build_program, pick_best


def make_chunks(n: int) -> list[Chunk]:
    return [Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=f"passage {i}", num_tokens=3) for i in range(n)]


def result(text: str, logprobs: tuple[float, ...] = ()) -> LLMResult:
    return LLMResult(text=text, prompt_tokens=10, output_tokens=max(1, len(text.split())), ttft_s=0.1,
                     total_s=0.2, token_logprobs=logprobs)


def drive(program, answer_for) -> tuple[str, list[list]]:
    batches = []
    try:
        calls = next(program)
        while True:
            batches.append(calls)
            calls = program.send([answer_for(c) for c in calls])
    except StopIteration as stop:
        return stop.value, batches


def test_stuff_is_one_call_over_all_chunks():
    answer, batches = drive(build_program("q?", make_chunks(5), RagPlan(Method.STUFF, 3), SynthesisConfig()),
                            lambda c: result("yes"))
    assert answer == "yes"
    assert [len(b) for b in batches] == [1]
    assert batches[0][0].chunk_ids == ("d0#0", "d1#0", "d2#0")
    assert "passage 2" in batches[0][0].messages[-1][1] and "passage 3" not in batches[0][0].messages[-1][1]


def test_map_rerank_fans_out_and_keeps_most_confident():
    by_chunk = {"d0#0": result("unknown", (-0.01,)), "d1#0": result("Paris", (-0.5, -0.5)),
                "d2#0": result("Lyon", (-0.1,))}
    answer, batches = drive(build_program("q?", make_chunks(3), RagPlan(Method.MAP_RERANK, 3), SynthesisConfig()),
                            lambda c: by_chunk[c.chunk_ids[0]])
    assert [len(b) for b in batches] == [3]          # one batch: the engine runs it together
    assert all(c.logprobs for c in batches[0])
    assert answer == "Lyon"


def test_pick_best_all_unknown():
    assert pick_best([result("unknown", (-0.1,)), result("Unknown.", (-0.1,))]).text == "unknown"


def test_map_reduce_caps_summaries_and_drops_none():
    summaries = {"d0#0": "fact A", "d1#0": "none", "d2#0": "fact C"}

    def answer_for(call):
        return result(summaries[call.chunk_ids[0]]) if call.tag == "map" else result("final")

    answer, batches = drive(build_program("q?", make_chunks(3), RagPlan(Method.MAP_REDUCE, 3, 40),
                                          SynthesisConfig()), answer_for)
    assert answer == "final"
    assert [len(b) for b in batches] == [3, 1]
    assert all(c.max_tokens == 40 for c in batches[0])
    reduce_prompt = batches[1][0].messages[-1][1]
    assert "fact A" in reduce_prompt and "fact C" in reduce_prompt and "none" not in reduce_prompt


def test_refine_is_sequential_and_threads_the_answer():
    seen = []

    def answer_for(call):
        seen.append(call.messages[-1][1])
        return result(f"answer{len(seen)}")

    answer, batches = drive(build_program("q?", make_chunks(3), RagPlan(Method.REFINE, 3, 30),
                                          SynthesisConfig(answer_tokens=50)), answer_for)
    assert [len(b) for b in batches] == [1, 1, 1]
    assert answer == "answer3"
    assert "answer1" in seen[1] and "answer2" in seen[2]
    assert [b[0].max_tokens for b in batches] == [30, 30, 50]


def test_answers_stop_at_newline_by_default():
    _, batches = drive(build_program("q?", make_chunks(1), RagPlan(Method.STUFF, 1), SynthesisConfig()),
                       lambda c: result("x"))
    assert batches[0][0].stop == ("\n",)


def test_summary_style_asks_every_answer_call_for_sentences():
    config = SynthesisConfig(answer_style="summary", answer_stop=())
    for method in Method:
        plan = RagPlan(method, 2, 16)
        _, batches = drive(build_program("q?", make_chunks(2), plan, config), lambda c: result("facts"))
        answer_calls = [c for b in batches for c in b if c.tag != "map"]
        assert answer_calls, method
        assert all("two to four sentences" in c.messages[0][1] and c.stop == () for c in answer_calls), method
    _, batches = drive(build_program("q?", make_chunks(1), RagPlan(Method.STUFF, 1), SynthesisConfig()),
                       lambda c: result("x"))
    assert "shortest answer" in batches[0][0].messages[0][1]


def test_unknown_answer_style_is_a_config_error():
    with pytest.raises(ConfigError, match="answer_style='essay' must be one of: short, summary"):
        SynthesisConfig(answer_style="essay")


ECHOES = [
    # what SmolLM2 wrote in the demo: the answer, then the system prompt's wording
    ("1988 a date or short phrase copied from the context, on one line, with no explanation.", "1988"),
    ("October 1973, with no explanation", "October 1973"),
    ("unknown If the context does not contain the answer, reply exactly: unknown", "unknown"),
    ("Reply with the shortest answer: a name", ""),
    ("The Black Death killed 75 to 200 million people.", "The Black Death killed 75 to 200 million people."),
]


@pytest.mark.parametrize("text, expected", ECHOES)
def test_clean_answer_cuts_an_echoed_instruction(text, expected):
    from ragserve.synthesis import clean_answer

    assert clean_answer(text) == expected


@pytest.mark.parametrize("method", list(Method))
def test_no_method_returns_the_instruction_text(method):
    plan = RagPlan(method, 2, 16 if method in (Method.MAP_REDUCE, Method.REFINE) else 0)
    answer, _ = drive(build_program("q?", make_chunks(2), plan, SynthesisConfig()),
                      lambda c: result(ECHOES[0][0], (-0.1,) * 5) if c.tag != "map" else result("facts"))
    assert answer == "1988"
