"""`ragserve` command line: ingest, query, demo, serve, collections, eval, tune, ui, blend check. Thin: parsing and printing only."""
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
    p.add_argument("--config", help="YAML/TOML config file (see ragserve/config.py for every field)")
    p.add_argument("--set", dest="set_top", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set metis.policy=sjf (repeatable; VALUE is YAML)")
    p.add_argument("-v", "--verbose", action="store_true", help="log decisions at INFO")
    sub = p.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="add .txt/.md files, a folder, or a corpus.jsonl to a collection")
    ing.add_argument("path")
    ing.add_argument("--collection", required=True)
    ing.add_argument("--model", help="serving model whose tokenizer sizes the chunks (smollm2|qwen)")
    ing.add_argument("--chunk-tokens", type=int, help="chunk size in model tokens (default 256)")
    ing.add_argument("--precompute-kv", action="store_true",
                     help="CacheBlend: store every chunk's KV now (data dir kv/), so blended queries reuse it")
    ing.add_argument("--steer", action="store_true",
                     help="with --precompute-kv: also store each chunk's LLMSteer scores (steered queries "
                          "then skip the two scoring prefills)")
    ing.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("query", help="answer a question over a collection")
    q.add_argument("question")
    q.add_argument("--collection", required=True)
    q.add_argument("--plan", help="METHOD:NUM_CHUNKS[:INTERMEDIATE_TOKENS], e.g. map_reduce:6:64")
    q.add_argument("--model", help="smollm2 | qwen")
    q.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata filter, e.g. doc_id=test-Bed003 (repeatable)")
    q.add_argument("--blend", action="store_true",
                   help="CacheBlend: prefill from stored chunk KV (as blend.enabled in config)")
    q.add_argument("--steer", action=argparse.BooleanOptionalAction, default=None,
                   help="LLMSteer in the embedded engine: attend more to the chunks' key tokens "
                        "(default: steer in config for the collection)")
    q.add_argument("--json", action="store_true", help="print one JSON object")

    d = sub.add_parser("demo", help="ingest the squad corpus and answer a few questions with the plan METIS "
                                    "chooses: answer, plan, why, timings, F1")
    d.add_argument("--model", help="smollm2 | qwen (default: qwen when the machine has the memory)")
    d.add_argument("--num", type=int, default=3, help="questions to answer")
    d.add_argument("--collection", default="squad-demo")

    s = sub.add_parser("serve", help="run the HTTP API (FastAPI/uvicorn; default 127.0.0.1:8000)")
    s.add_argument("--host", help="listen address (default server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default server.port, 8000)")
    s.add_argument("--model", help="smollm2 | qwen")

    e = sub.add_parser("eval", help="replay a Poisson workload of a dataset against fixed/adaptive/metis systems")
    _eval_common(e)
    e.add_argument("--systems", default="fixed,adaptive,metis",
                   help="comma-separated: fixed (the whole --grid), fixed:<plan>, adaptive, metis, metis+blend, tuned, tuned+blend")
    e.add_argument("--grid", help="fixed plans, comma-separated METHOD:NUM_CHUNKS[:INTERMEDIATE] "
                                  "(default map_rerank:4,stuff:2,stuff:6,map_reduce:4:32)")
    e.add_argument("--rate", default="auto",
                   help="arrivals per second (Poisson), inf (all at once) or auto (1.5x the measured "
                        "one-at-a-time service rate of stuff:4; default)")
    e.add_argument("--learned", help="learned profiler directory for adaptive/metis (default: the LLM profiler)")
    e.add_argument("--quality", action="append", default=[],
                   help="tuned: tuning sweep dir(s) of this dataset to cross-fit the quality model on "
                        "(repeatable); queries in the sweep are planned by a fold model that never saw them")
    e.add_argument("--rate-factor", type=float, default=1.5,
                   help="rate auto: arrivals at this x the one-at-a-time rate of --calibration-plan (default 1.5)")
    e.add_argument("--calibration-plan", default="stuff:4",
                   help="rate auto: the plan whose one-at-a-time rate sets the load (default stuff:4; use the "
                        "best fixed plan to load relative to its capacity)")
    e.add_argument("--questions-from", help="evaluate exactly the questions of this tuning sweep dir (the "
                                            "simulator's validation: same queries as its records)")
    e.add_argument("--warmup", type=int, default=1, help="untimed queries before the first system (default 1)")
    e.add_argument("--no-resume", action="store_true",
                   help="run every system again; by default systems finished earlier under --out "
                        "(OUT/systems/, same workload and settings) are reused")
    e.add_argument("--kv-budget-mb", type=float,
                   help="embedded engine KV budget (default engine.kv_budget_mb, 512); smaller makes "
                        "concurrent queries compete for KV, the load METIS' best fit reacts to")
    e.add_argument("--feedback-every", type=int,
                   help="METIS golden-plan feedback every N queries, 0 = off (default metis.feedback_every, 30)")

    c = sub.add_parser("collections", help="list collections (and whether they load) or roll one back")
    c.add_argument("action", choices=["list", "rollback"],
                   help="rollback NAME: make the previous stored generation current again")
    c.add_argument("name", nargs="?", help="the collection (rollback)")
    b = sub.add_parser("blend", help="CacheBlend quality gate: `blend check` measures blended vs full prefill "
                                     "on a collection's chunks and stores the verdict the engine follows")
    b.add_argument("action", choices=["check"])
    b.add_argument("--collection", required=True)
    b.add_argument("--model", help="smollm2 | qwen")
    b.add_argument("--questions", help="text file, one question per line (default: generated from the chunks)")
    b.add_argument("--num-prompts", type=int, default=8, help="sampled prompts (default 8)")
    b.add_argument("--chunks-per-prompt", type=int, default=4, help="chunks per sampled prompt (default 4)")
    b.add_argument("--ratios", help="candidate ratios, comma-separated (default 0.05,0.1,0.15,0.2,0.3,0.5)")
    b.add_argument("--max-kl", type=float, help="pass: mean first-token KL at most this (default 0.2)")
    b.add_argument("--min-agreement", type=float, help="pass: first-token agreement at least this (default 0.8)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true", help="print the verdict as JSON")

    u = sub.add_parser("ui", help="open the Streamlit quality-latency explorer (ui/app.py)")
    u.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=8501, help="listen port (default 8501)")
    u.add_argument("--server-url", help="ragserve server the explorer queries (default http://127.0.0.1:8000)")

    t = sub.add_parser("tune", help="offline plan sweep (tune) or fit the learned profiler (tune train-profiler DIR)")
    t.add_argument("action", nargs="?", choices=["sweep", "train-profiler", "train-quality"], default="sweep")
    t.add_argument("profiles", nargs="*", help="train-profiler / train-quality: tuning profile dir(s), "
                                              "e.g. profiles/qwen/squad")
    _eval_common(t, required=False)
    t.add_argument("--grid", help="plans to sweep, comma-separated METHOD:NUM_CHUNKS[:INTERMEDIATE] "
                                  "(default: ragserve.eval.tuning.DEFAULT_TUNE_GRID)")
    t.add_argument("--collection", help="tune a collection of your own (no gold answers): label each plan by "
                                        "agreement with the golden plan's answer; needs --questions")
    t.add_argument("--questions", help="with --collection: questions, one per line (or JSONL with \"question\")")
    t.add_argument("--concurrency", type=int,
                   help="(query, plan) cells run at once on the engine (default 1 for a dataset sweep: "
                        "idle latencies; 4 for --collection)")
    t.add_argument("--holdout", type=int, default=0,
                   help="never tune on the questions `ragserve eval --num HOLDOUT` (same --seed) samples")
    t.add_argument("--ray", metavar="auto|ADDRESS|local",
                   help="run the sweep's (query, plan) cells on Ray workers, each with its own engine: auto or "
                        "HOST:PORT = a running cluster, local = a private one on 127.0.0.1 (pip install -e '.[scale]')")
    t.add_argument("--ray-workers", type=int, help="Ray workers (default: one per CPU of the cluster)")
    for command in (ing, q, d, s, c, b, e, u, t):   # the settings go before or after the command
        command.add_argument("--config", default=argparse.SUPPRESS,
                             help="YAML/TOML config file (see ragserve/config.py for every field)")
        if command is not u:   # the explorer reads its config file itself
            command.add_argument("--set", action="append", default=argparse.SUPPRESS, metavar="SECTION.KEY=VALUE",
                                 help="override one config key, e.g. --set metis.policy=sjf (repeatable)")
    return p


def _eval_common(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--dataset", required=required, help="squad | 2wikimultihopqa | qmsum | financebench")
    p.add_argument("--num", type=int, default=100, help="questions sampled (seeded; default 100)")
    p.add_argument("--seed", type=int, default=0, help="sample and arrival seed (default 0)")
    p.add_argument("--engine", choices=["local", "vllm"], help="engine backend (default engine.backend)")
    p.add_argument("--model", help="smollm2 | qwen")
    p.add_argument("--out", help="output directory (eval: eval/results/NAME; tune: profiles/MODEL/DATASET)")
    p.add_argument("--datasets-dir", help="folder holding the datasets (default RAGSERVE_DATASETS or ../shared/datasets)")
    p.add_argument("--corpus-limit", type=int,
                   help="SMOKE RUNS ONLY: ingest the sampled questions' gold passages plus this many others")
    p.add_argument("--doc-filter", action="store_true",
                   help="financebench: retrieve only from the question's filing (qmsum always filters by meeting)")
    p.add_argument("--no-progress", action="store_true")


def _overrides(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "set_top", [])) + list(getattr(args, "set", []))


def _config(args: argparse.Namespace) -> Config:
    config = Config.load(args.config, _overrides(args))
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

    if args.steer and not args.precompute_kv:   # before ingesting anything
        from ragserve.errors import BadInput
        raise BadInput("--steer stores steering scores with the chunk KV: add --precompute-kv")
    config = _config(args)
    report = ingest(args.path, args.collection, load_tokenizer(config.engine.model), Embedder(),
                    config.retrieval, progress=not args.no_progress)
    print(f"collection {report.collection}: +{report.added} chunks, {report.skipped} already stored, "
          f"{report.removed} replaced, from {report.num_documents} documents; "
          f"{report.num_chunks_total} chunks total ({report.elapsed_s:.1f} s)")
    if args.precompute_kv:
        _precompute_kv(config, args.collection, args.steer)
    return 0


def _precompute_kv(config: Config, collection: str, steer: bool = False) -> None:
    from ragserve.engines.local.engine import LocalEngine
    from ragserve.retrieval.base import open_store

    chunks = list(open_store(config.retrieval).open(collection).iter_chunks())
    engine = LocalEngine(config.engine, blend=replace(config.blend, enabled=True))
    try:
        stats = engine.precompute_kv(chunks, steer=steer)
        counters = engine.steer_counters
    finally:
        asyncio.run(engine.close())
    # segments = each chunk plus the answer prompt's shared prefix
    print(f"chunk KV of {len(chunks)} chunks: {stats.num_computed} segments computed "
          f"({stats.compute_s:.1f} s), {stats.num_ram + stats.num_disk} found stored")
    if steer:
        print(f"steering scores of {len(chunks)} chunks: {int(counters['scored_chunks'])} computed "
              f"({counters['score_s']:.1f} s), {int(counters['stored_chunks'])} found stored")


def cmd_blend(args: argparse.Namespace) -> int:
    from ragserve.engines.local import blend_gate
    from ragserve.engines.local.engine import LocalEngine
    from ragserve.errors import BadInput
    from ragserve.retrieval.store import Collection

    chunks = list(Collection.open(args.collection).iter_chunks())
    questions: list[str] = []
    if args.questions:
        try:
            questions = [line.strip() for line in Path(args.questions).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise BadInput(f"--questions {args.questions!r}: {exc}") from None
        if not questions:
            raise BadInput(f"--questions {args.questions!r} holds no question (one per line)")
    try:
        ratios = ([float(x) for x in args.ratios.split(",") if x.strip()] if args.ratios
                  else list(blend_gate.DEFAULT_RATIOS))
    except ValueError:
        raise BadInput(f"--ratios {args.ratios!r} must be comma-separated numbers, e.g. 0.1,0.15,0.3") from None
    if not ratios or not all(0.0 <= r <= 1.0 for r in ratios):
        raise BadInput(f"--ratios {args.ratios!r}: give ratios in [0, 1]")
    defaults = blend_gate.GateThresholds()
    thresholds = blend_gate.GateThresholds(
        max_kl=args.max_kl if args.max_kl is not None else defaults.max_kl,
        min_first_token_agreement=args.min_agreement if args.min_agreement is not None
        else defaults.min_first_token_agreement)
    config = _config(args)
    engine = LocalEngine(config.engine, blend=replace(config.blend, enabled=True))
    try:
        if engine.blender is None:
            raise BadInput(f"model {config.engine.model!r} cannot blend (see the warning above)")
        verdict = blend_gate.check(engine.blender, engine.tokenizer, args.collection, chunks, engine.blend_config,
                                   questions, ratios, thresholds, args.num_prompts, args.chunks_per_prompt,
                                   args.seed)
        path = blend_gate.save_verdict(engine.blender.store, verdict)
    finally:
        asyncio.run(engine.close())
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=1))
        return 0
    for pt in verdict.points:
        print(f"ratio {pt.ratio:.2f}: first-token KL {pt.kl:.4f}, agreement {pt.first_token_agreement:.2f}"
              f" -> {'pass' if pt.passed else 'fail'}")
    if verdict.ratio is None:
        print(f"verdict: blending REFUSED for {verdict.model_id} on {args.collection!r}: {blend_gate.describe(verdict)}")
    else:
        print(f"verdict: blend {args.collection!r} at ratio {verdict.ratio} ({verdict.num_prompts} prompts)")
    print(f"stored in {path}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from ragserve.controller import validate_question
    from ragserve.domain import RagPlan
    from ragserve.retrieval.base import open_store
    from ragserve.runtime import build_runtime

    config = _config(args)                        # fail fast, before loading a model
    validate_question(args.question)
    plan = RagPlan.parse(args.plan) if args.plan else None
    filters = _filters(args.filter)
    col = open_store(config.retrieval).open(args.collection)
    if plan and plan.num_chunks > len(col):     # fail before loading a model
        from ragserve.errors import BadInput
        raise BadInput(f"num_chunks {plan.num_chunks} is above the size of collection "
                       f"{args.collection!r} ({len(col)} chunks)")
    if args.blend:
        config = replace(config, blend=replace(config.blend, enabled=True))

    async def run():
        rt = build_runtime(config)
        try:
            return await rt.controller.query(args.question, args.collection, plan, filters, steer=args.steer)
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
    d = result.decision
    if d.reason is not None:
        print(f"  decision: {d.reason}" + (f", kv_free_tokens={d.kv_free_tokens}" if d.kv_free_tokens is not None else "")
              + (f"; profile {d.profile}" if d.profile is not None else ""))


def cmd_demo(args: argparse.Namespace) -> int:
    from ragserve.demo import run_demo

    return run_demo(_config(args), args.collection, args.num, model=args.model)


def cmd_collections(args: argparse.Namespace) -> int:
    from ragserve.errors import BadInput, CollectionDamaged
    from ragserve.retrieval.store import Collection, list_collections

    if args.action == "rollback":
        if not args.name:
            raise BadInput("rollback needs the collection: ragserve collections rollback NAME")
        left, now = Collection.rollback(args.name)
        print(f"collection {args.name}: generation {now} is current again"
              + (f" (generation {left} removed)" if left is not None else ""))
        return 0
    status = 0
    for name in list_collections():
        try:
            col = Collection.open(name)
        except CollectionDamaged as exc:
            print(f"{name}\tdamaged\t{exc}")
            status = 1
            continue
        print(f"{name}\tok\t{len(col)} chunks, {col.num_documents} documents, generation {col.generation}")
    return status


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)   # settings first: a bad file fails before anything heavy is imported
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = replace(config, server=replace(config.server, **overrides))
    from ragserve.server.app import serve

    serve(config)   # binds the port before loading the model
    return 0


def _command_line(args: argparse.Namespace) -> str:
    import shlex

    return "ragserve " + shlex.join(args.argv)


def _eval_config(args: argparse.Namespace) -> Config:
    config = _config(args)
    if args.engine:
        config = replace(config, engine=replace(config.engine, backend=args.engine))
    if getattr(args, "learned", None):
        config = replace(config, metis=replace(config.metis, learned_profiler=args.learned))
    if getattr(args, "kv_budget_mb", None):
        config = replace(config, engine=replace(config.engine, kv_budget_mb=args.kv_budget_mb))
    if getattr(args, "feedback_every", None) is not None:
        config = replace(config, metis=replace(config.metis, feedback_every=args.feedback_every))
    return config


def cmd_eval(args: argparse.Namespace) -> int:
    from ragserve.errors import BadInput
    from ragserve.eval.runner import EvalSettings, rate_arg, run_eval
    from ragserve.eval.systems import parse_grid, parse_systems
    from ragserve.domain import RagPlan

    if not args.out:
        raise BadInput("--out is required, e.g. --out eval/results/squad-qwen")
    try:
        rate = rate_arg(args.rate)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    grid = parse_grid(args.grid)
    settings = EvalSettings(dataset=args.dataset, systems=tuple(parse_systems(args.systems, grid)), num=args.num,
                            rate=rate, out=Path(args.out), seed=args.seed, corpus_limit=args.corpus_limit,
                            doc_filter=args.doc_filter, datasets_root=args.datasets_dir, warmup=args.warmup,
                            progress=not args.no_progress, command=_command_line(args), grid=grid,
                            resume=not args.no_resume, quality=tuple(args.quality),
                            question_ids=_sweep_ids(args.questions_from), rate_factor=args.rate_factor,
                            calibration_plan=RagPlan.parse(args.calibration_plan))
    report = run_eval(settings, _eval_config(args))
    print(Path(args.out, "report.md").read_text())
    return 0 if report["systems"] else 1


def _sweep_ids(profile_dir: str | None) -> tuple[str, ...]:
    if not profile_dir:
        return ()
    from ragserve.eval.tuning import read_meta

    return tuple(read_meta(profile_dir).query_ids)


def cmd_tune(args: argparse.Namespace) -> int:
    from ragserve.errors import BadInput

    if args.action == "train-quality":
        from ragserve.eval.quality_training import train_quality

        if not args.profiles:
            raise BadInput("train-quality needs tuning profile dir(s), e.g. ragserve tune train-quality "
                           "profiles/qwen/squad")
        target = args.out or str(Path(args.profiles[0]) / "quality")
        report = train_quality(args.profiles, target, datasets_root=args.datasets_dir,
                               progress=not args.no_progress)
        print(f"quality model saved to {target} ({report['num_queries']} queries; cross-fitted selection:)")
        print(json.dumps(report, indent=2))
        return 0
    if args.action == "train-profiler":
        from ragserve.eval.training import train_profiler

        if not args.profiles:
            raise BadInput("train-profiler needs tuning profile dir(s), e.g. ragserve tune train-profiler "
                           "profiles/qwen/squad")
        _, report = train_profiler(args.profiles, out=args.out)
        target = args.out or str(Path(args.profiles[0]) / "learned")
        print(f"learned profiler saved to {target} ({report['num_queries']} tuned queries)")
        print(json.dumps({k: report[k] for k in ("label_counts", "cross_validation", "inference")}, indent=2))
        return 0
    from ragserve.eval.systems import parse_grid
    from ragserve.eval.tuning import DEFAULT_TUNE_GRID, TuneSettings, run_tune

    if args.profiles:
        raise BadInput(f"unexpected arguments {args.profiles}; did you mean: ragserve tune train-profiler DIR")
    if args.collection or args.questions:
        return _tune_collection(args)
    if not args.dataset:
        raise BadInput("tune needs --dataset (squad | 2wikimultihopqa | qmsum | financebench)")
    config = _eval_config(args)
    out = Path(args.out or Path("profiles") / config.engine.model / args.dataset)
    settings = TuneSettings(dataset=args.dataset, num=args.num, out=out,
                            grid=parse_grid(args.grid) if args.grid else DEFAULT_TUNE_GRID, seed=args.seed,
                            corpus_limit=args.corpus_limit, doc_filter=args.doc_filter,
                            datasets_root=args.datasets_dir, progress=not args.no_progress,
                            command=_command_line(args), holdout=args.holdout, ray=args.ray,
                            ray_workers=args.ray_workers, concurrency=args.concurrency or 1)
    if settings.concurrency < 1:
        raise BadInput(f"--concurrency {settings.concurrency} must be >= 1")
    if args.ray_workers is not None and args.ray_workers < 1:
        raise BadInput(f"--ray-workers {args.ray_workers} must be >= 1")
    run_tune(settings, config)
    print((out / "summary.md").read_text())
    return 0


def _tune_collection(args: argparse.Namespace) -> int:
    from ragserve.errors import BadInput
    from ragserve.eval.golden import GOLDEN_GRID, run_collection_tune
    from ragserve.eval.systems import parse_grid
    from ragserve.retrieval.store import Collection
    from ragserve.metis.tuned import QUALITY_DIR

    if not (args.collection and args.questions):
        raise BadInput("tuning a collection needs both --collection NAME and --questions FILE")
    if args.dataset:
        raise BadInput("--dataset and --collection are exclusive: a dataset sweep scores against gold answers")
    col = Collection.open(args.collection)
    grid = parse_grid(args.grid) if args.grid else GOLDEN_GRID
    out = Path(args.out) if args.out else col.path / "tune"
    report = run_collection_tune(args.collection, args.questions, grid, out, col.path / QUALITY_DIR,
                                 _eval_config(args), concurrency=args.concurrency or 4)
    print(f"tuned {args.collection}: {report['records']} records in {out}; quality model in {report['model_dir']} "
          "(ragserve query/serve now plan this collection with it)")
    print(json.dumps(report["quality"], indent=2))
    return 0


def ui_command(args: argparse.Namespace) -> list[str]:
    """The `streamlit run` command line of `ragserve ui`; options after `--` go to ui/app.py."""
    from ragserve.errors import BadInput

    app = Path(__file__).resolve().parents[1] / "ui" / "app.py"
    if not app.is_file():
        raise BadInput(f"{app} not found: `ragserve ui` runs from a source checkout (ui/ is not installed)")
    # No file watcher: it polls the whole tree, which costs CPU and is only useful while editing.
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--"]
    if args.server_url:
        cmd += ["--server-url", args.server_url]
    if args.config:
        cmd += ["--config", args.config]
    return cmd


def cmd_ui(args: argparse.Namespace) -> int:
    import importlib.util

    from ragserve.errors import BadInput

    if importlib.util.find_spec("streamlit") is None:
        raise BadInput("the explorer needs streamlit and plotly: pip install -e '.[ui]'")
    if _overrides(args):
        raise BadInput("ragserve ui reads its settings from --config FILE only; put the --set keys in that file")
    Config.load(args.config)   # a bad config fails here, not in the browser
    cmd = ui_command(args)
    os.execv(cmd[0], cmd)   # streamlit takes over the process (and its signals)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # weights come from packages, never a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    verbose = args.verbose or args.command == "serve"   # a server logs its decisions
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handlers = {"ingest": cmd_ingest, "query": cmd_query, "demo": cmd_demo, "serve": cmd_serve,
                "eval": cmd_eval, "tune": cmd_tune, "ui": cmd_ui, "collections": cmd_collections,
                "blend": cmd_blend}
    try:
        return handlers[args.command](args)
    except RagServeError as exc:
        print(f"ragserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
