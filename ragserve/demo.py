"""`ragserve demo`: ingest the squad corpus, answer a few questions under each method."""
from __future__ import annotations

import asyncio
import json
import random
import statistics

from ragserve.config import Config, datasets_dir
from ragserve.domain import Method, RagPlan
from ragserve.errors import NotFound
from ragserve.metrics import best_f1

DEMO_PLANS = (RagPlan(Method.STUFF, 3), RagPlan(Method.MAP_RERANK, 3),
              RagPlan(Method.MAP_REDUCE, 3, 48), RagPlan(Method.REFINE, 2, 48))


def load_questions(dataset: str, num: int, seed: str = "ragserve-demo") -> list[dict]:
    path = datasets_dir() / dataset / "questions.jsonl"
    if not path.is_file():
        raise NotFound(f"dataset file {str(path)!r} not found; set RAGSERVE_DATASETS to the shared datasets dir")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return random.Random(seed).sample(rows, min(num, len(rows)))


def run_demo(config: Config, collection: str, num: int) -> int:
    from ragserve.engines.local.models import load_tokenizer
    from ragserve.retrieval.embeddings import Embedder
    from ragserve.retrieval.ingest import ingest
    from ragserve.runtime import build_runtime

    corpus = datasets_dir() / "squad" / "corpus.jsonl"
    if not corpus.is_file():
        raise NotFound(f"{str(corpus)!r} not found; set RAGSERVE_DATASETS to the shared datasets dir")
    print(f"ingesting {corpus} into collection {collection!r} (model {config.engine.model}) ...")
    report = ingest(corpus, collection, load_tokenizer(config.engine.model), Embedder(), config.retrieval)
    print(f"  +{report.added} chunks ({report.skipped} already stored), {report.num_chunks_total} total, "
          f"{report.elapsed_s:.1f} s")
    questions = load_questions("squad", num)

    async def run() -> dict[str, list[float]]:
        rt = build_runtime(config)
        f1s: dict[str, list[float]] = {str(p): [] for p in DEMO_PLANS}
        try:
            for q in questions:
                print(f"\nQ: {q['question']}\n   gold: {q['answers'][0]!r}")
                for plan in DEMO_PLANS:
                    r = await rt.controller.query(q["question"], collection, plan)
                    f1 = best_f1(r.answer, q["answers"])
                    f1s[str(plan)].append(f1)
                    t = r.timings
                    print(f"   {str(plan):<16} F1 {f1:4.2f}  ttft {t.ttft_s:5.2f}s  total {t.total_s:5.2f}s  "
                          f"calls {r.num_calls}  tokens {r.prompt_tokens}+{r.output_tokens}  -> {r.answer[:70]!r}")
        finally:
            await rt.close()
        return f1s

    f1s = asyncio.run(run())
    print("\nmean F1 per plan:")
    for plan, values in f1s.items():
        print(f"   {plan:<16} {statistics.mean(values):.3f}")
    return 0
