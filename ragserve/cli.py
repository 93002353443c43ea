"""`ragserve` command line: ingest, query, demo. Thin: parsing and printing only."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ragserve.config import Config
from ragserve.errors import RagServeError

logger = logging.getLogger("ragserve")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ragserve", description="RAG serving controller (METIS + CacheBlend).")
    p.add_argument("--config", help="YAML config file (see ragserve/config.py for every field)")
    p.add_argument("-v", "--verbose", action="store_true", help="log decisions at INFO")
    sub = p.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="add .txt/.md files, a folder, or a corpus.jsonl to a collection")
    ing.add_argument("path")
    ing.add_argument("--collection", required=True)
    ing.add_argument("--model", help="serving model whose tokenizer sizes the chunks (smollm2|qwen)")
    ing.add_argument("--chunk-tokens", type=int, help="chunk size in model tokens (default 256)")
    ing.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("query", help="answer a question over a collection")
    q.add_argument("question")
    q.add_argument("--collection", required=True)
    q.add_argument("--plan", help="METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS], e.g. map_reduce:6:64")
    q.add_argument("--model", help="smollm2 | qwen")
    q.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata filter, e.g. doc_id=test-Bed003 (repeatable)")
    q.add_argument("--json", action="store_true", help="print one JSON object")

    d = sub.add_parser("demo", help="ingest the squad corpus, answer a few questions, print plan/timings/F1")
    d.add_argument("--model", help="smollm2 | qwen")
    d.add_argument("--num", type=int, default=3, help="questions to answer")
    d.add_argument("--collection", default="squad-demo")
    return p


def _config(args: argparse.Namespace) -> Config:
    config = Config.load(args.config)
    if getattr(args, "model", None):
        config = replace(config, engine=replace(config.engine, model=args.model))
    if getattr(args, "chunk_tokens", None):
        config = replace(config, retrieval=replace(config.retrieval, chunk_tokens=args.chunk_tokens))
    return config


def _filters(items: Sequence[str]) -> dict[str, Any] | None:
    from ragserve.errors import BadInput

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"filter {item!r} is not KEY=VALUE")
        out[key] = value
    return out or None


def cmd_ingest(args: argparse.Namespace) -> int:
    from ragserve.engines.local.models import load_tokenizer
    from ragserve.retrieval.embeddings import Embedder
    from ragserve.retrieval.ingest import ingest

    config = _config(args)
    report = ingest(args.path, args.collection, load_tokenizer(config.engine.model), Embedder(),
                    config.retrieval, progress=not args.no_progress)
    print(f"collection {report.collection}: +{report.added} chunks, {report.skipped} already stored, "
          f"{report.removed} replaced, from {report.num_documents} documents; "
          f"{report.num_chunks_total} chunks total ({report.elapsed_s:.1f} s)")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from ragserve.controller import validate_question
    from ragserve.retrieval.store import Collection
    from ragserve.runtime import build_runtime, parse_plan

    validate_question(args.question)              # fail fast, before loading a model
    plan = parse_plan(args.plan) if args.plan else None
    filters = _filters(args.filter)
    col = Collection.open(args.collection)
    if plan and plan.num_chunks > len(col):     # fail before loading a model
        from ragserve.errors import BadInput
        raise BadInput(f"num_chunks {plan.num_chunks} is above the size of collection "
                       f"{args.collection!r} ({len(col)} chunks)")
    config = _config(args)

    async def run():
        rt = build_runtime(config)
        try:
            return await rt.controller.query(args.question, args.collection, plan, filters)
        finally:
            await rt.close()

    result = asyncio.run(run())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_result(result)
    return 0


def _print_result(result) -> None:
    t = result.timings
    print(result.answer)
    print(f"  plan: {result.plan}  ({result.num_calls} LLM calls, {result.prompt_tokens} prompt + "
          f"{result.output_tokens} output tokens)")
    print(f"  chunks: " + ", ".join(f"{c.chunk.id} ({c.score:.2f})" for c in result.chunks))
    print(f"  timings: retrieve {t.retrieve_s:.2f}s  queue {t.queue_s:.2f}s  ttft {t.ttft_s:.2f}s  total {t.total_s:.2f}s")
    if "reason" in result.decision:
        print(f"  decision: {result.decision['reason']}, kv_free_tokens={result.decision.get('kv_free_tokens')}")


def cmd_demo(args: argparse.Namespace) -> int:
    from ragserve.demo import run_demo

    return run_demo(_config(args), args.collection, args.num)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # weights come from packages, never a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handlers = {"ingest": cmd_ingest, "query": cmd_query, "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except RagServeError as exc:
        print(f"ragserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
