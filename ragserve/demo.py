"""`ragserve demo`: the product in one command. Ingest the squad articles of a few sampled
questions, then answer them the way `serve` does: METIS profiles each question, prunes the plan space
and picks the plan that fits the engine's free KV; the demo prints the answer next to the
gold one, the plan, why it was chosen, and where the time went.

The model defaults to Qwen2.5-0.5B (it answers squad well; SmolLM2-135M mostly does not)
when the machine has the memory for it, else SmolLM2.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragserve.config import Config, datasets_dir
from ragserve.errors import NotFound
from ragserve.metrics import best_f1

if TYPE_CHECKING:
    from ragserve.retrieval.chunking import Document

QUALITY_MODEL = "qwen"
FAST_MODEL = "smollm2"
QUALITY_MODEL_MIN_AVAILABLE_GIB = 5.0   # the Qwen demo peaked at 4.5 GB RSS (fp32 weights, KV budget, embedder)


def load_questions(dataset: str, num: int, seed: str = "ragserve-demo") -> list[dict]:
    path = datasets_dir() / dataset / "questions.jsonl"
    if not path.is_file():
        raise NotFound(f"dataset file {str(path)!r} not found; set RAGSERVE_DATASETS to the shared datasets dir")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return random.Random(seed).sample(rows, min(num, len(rows)))


def available_gib() -> float | None:
    """MemAvailable of /proc/meminfo in GiB; None where there is no /proc (not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def demo_model(requested: str | None) -> tuple[str, str]:
    """(model, why): the requested one, else Qwen when the memory allows, else SmolLM2."""
    if requested:
        return requested, "as asked"
    free = available_gib()
    if free is not None and free < QUALITY_MODEL_MIN_AVAILABLE_GIB:
        return FAST_MODEL, (f"only {free:.1f} GiB memory available (Qwen wants "
                            f"{QUALITY_MODEL_MIN_AVAILABLE_GIB:g}); answers will be weaker")
    return QUALITY_MODEL, "the quality model; --model smollm2 runs the fast test model"


def decision_dict(decision: Any) -> dict[str, Any]:
    """A `PlanDecision` as the JSON fields `explain` reads ({} for a plan given, not chosen)."""
    details = decision.details()
    if not details and decision.profile is None:
        return {}
    return {"profile": decision.profile.to_dict() if decision.profile is not None else None, **details}


def explain(decision: dict[str, Any]) -> list[str]:
    """The planner's decision in words: the profile, the pruned plans, the pick and why."""
    if not decision:
        return ["plan given, not chosen"]
    lines = []
    profile = decision.get("profile") or {}
    if profile:
        joint = "needs" if profile.get("joint_reasoning") else "no"
        lo, hi = (profile.get("summary_range") or [0, 0])[:2]
        lines.append(f"profile: {profile.get('complexity')} complexity, {joint} joint reasoning, "
                     f"{profile.get('pieces')} piece(s) of information, summaries of {lo}-{hi} tokens "
                     f"(confidence {profile.get('confidence', 0):.2f}, {profile.get('source')} profiler)")
    pruned = [_plan_str(p) for p in decision.get("pruned") or []]
    if pruned:
        lines.append(f"pruned plan space: {', '.join(pruned[:6])}{' ...' if len(pruned) > 6 else ''} "
                     f"({len(pruned)} plans)")
    reason = decision.get("reason")
    why = {"fit": "the most expensive pruned plan that fits the free KV memory",
           "slo": "a cheaper pruned plan, to meet the latency target",
           "fallback": "no pruned plan fits: the fallback method with fewer chunks",
           "quality": "the best predicted quality for its service time",
           "load": "a cheaper plan than on an idle engine: the queue makes time dear"}.get(str(reason), str(reason))
    free = decision.get("kv_free_tokens")
    lines.append(f"chosen: {why}" + (f" ({free} KV tokens free)" if free is not None else ""))
    return lines


def _plan_str(plan: dict[str, Any]) -> str:
    tail = f":{plan['intermediate_tokens']}" if plan.get("intermediate_tokens") else ""
    return f"{plan['method']}:{plan['num_chunks']}{tail}"


def article_documents(corpus: Path, titles: set[str]) -> list["Document"]:
    """The corpus passages of the squad articles `titles`: every passage of an article, so
    retrieval still has to find the right one among its neighbours (the whole corpus takes
    minutes to embed on a small CPU)."""
    from ragserve.retrieval.chunking import load_documents

    return [d for d in load_documents(corpus) if d.title in titles]


def run_demo(config: Config, collection: str, num: int, model: str | None = None) -> int:
    from ragserve.engines.local.models import load_tokenizer
    from ragserve.retrieval.embeddings import Embedder
    from ragserve.retrieval.ingest import ingest_documents
    from ragserve.runtime import build_runtime

    name, why = demo_model(model)
    config = replace(config, engine=replace(config.engine, model=name))
    corpus = datasets_dir() / "squad" / "corpus.jsonl"
    if not corpus.is_file():
        raise NotFound(f"{str(corpus)!r} not found; set RAGSERVE_DATASETS to the shared datasets dir")
    print(f"model: {name} ({why})")
    t0 = time.perf_counter()
    questions = load_questions("squad", num)
    docs = article_documents(corpus, {q["title"] for q in questions})
    print(f"ingesting {len(docs)} passages ({len({d.title for d in docs})} squad articles, the questions' own "
          f"and their distractors) into collection {collection!r} ...")
    report = ingest_documents(docs, collection, load_tokenizer(name), Embedder(), config.retrieval,
                              progress=True, source=str(corpus))
    print(f"  +{report.added} chunks ({report.skipped} already stored), {report.num_chunks_total} total, "
          f"{report.elapsed_s:.1f} s")

    async def run() -> list[float]:
        t_load = time.perf_counter()
        rt = build_runtime(config)
        print(f"model loaded in {time.perf_counter() - t_load:.1f} s")
        f1s = []
        try:
            for q in questions:
                r = await rt.controller.query(q["question"], collection)   # METIS chooses the plan
                f1 = best_f1(r.answer, q["answers"])
                f1s.append(f1)
                t = r.timings
                print(f"\nQ: {q['question']}\nA: {r.answer}\n   gold: {q['answers'][0]!r}  (F1 {f1:.2f})")
                print(f"   plan: {r.plan}  ({r.num_calls} LLM calls, {r.prompt_tokens} prompt + "
                      f"{r.output_tokens} output tokens)")
                for line in explain(decision_dict(r.decision)):
                    print(f"   {line}")
                print(f"   time: retrieve {t.retrieve_s:.2f} s, profile {t.profile_s:.2f} s, queue "
                      f"{t.queue_s:.2f} s, first token {t.ttft_s:.2f} s, total {t.total_s:.2f} s")
        finally:
            await rt.close()
        return f1s

    f1s = asyncio.run(run())
    print(f"\nmean F1 over {len(f1s)} questions: {statistics.mean(f1s):.2f}  "
          f"(whole demo {time.perf_counter() - t0:.0f} s)")
    print("next: ragserve query \"...\" --collection " + collection + "   |   ragserve serve   |   README.md")
    return 0
