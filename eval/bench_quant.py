"""Answer quality of the quantized embedded engine against the unquantized one.

    python eval/bench_quant.py --model qwen --datasets squad,2wikimultihopqa --num 200 --modes none,int8

Per question: retrieve the top 2 chunks (MiniLM, the dataset's collection; `--corpus-limit`
keeps the gold passages plus that many others), build the production stuff:2 call
(`synthesis.build_program`, the dataset's answer length/stop/style) and greedy-decode it on
every mode's `ModelRunner` (prefill + decode steps, up to `--batch` questions together, the
engine's own greedy sampling and stop rules). Modes run on the same prompts, so every
difference is paired: F1(mode) - F1(none) with a 95% CI (normal, per-question differences),
and first-token agreement (the argmax after prefill) with a Wilson 95% interval.

Rows append to eval/results/bench_quant.jsonl as they finish: rerunning resumes. Writes
eval/results/bench_quant.json and .md from whatever rows exist (marked partial when a
dataset has fewer than --num questions done).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragserve.config import Config, EngineConfig  # noqa: E402
from ragserve.domain import Method, RagPlan  # noqa: E402
from ragserve.eval.datasets import (apply_dataset_settings, ensure_collection, get_spec,  # noqa: E402
                                    load_questions, query_filters, score)

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_quant")


def make_runner(model: str, mode: str):
    from ragserve.config import dtype_override, num_threads
    from ragserve.engines.local.models import model_dir, quantized_dir
    from ragserve.engines.local.runner import ModelRunner

    return ModelRunner(model_dir(model), model, num_threads(), dtype_override(), mode, quantized_dir(model, mode))


def greedy(runner, calls) -> list[tuple[int, str, int]]:
    """(first token, answer text, output tokens) per call: the engine's greedy decode."""
    prompts = [runner.encode_call(c) for c in calls]
    kv, logits = runner.prefill(prompts)
    rows = list(range(len(calls)))
    out: list[list[int]] = [[] for _ in calls]
    first: list[int] = [0] * len(calls)
    texts = [""] * len(calls)
    step = 0
    while rows:
        tokens, _ = runner.sample(logits, [0.0] * len(rows))
        keep = []
        for j, (i, tok) in enumerate(zip(rows, tokens.tolist())):
            if step == 0:
                first[i] = tok
            if tok in runner.eos_ids:
                continue
            out[i].append(tok)
            text = runner.decode(out[i])
            stop = next((s for s in calls[i].stop if s and s in text), None)
            if stop is not None:
                texts[i] = text[: text.index(stop)]
                continue
            texts[i] = text
            if len(out[i]) < calls[i].max_tokens:
                keep.append(j)
        rows = [rows[j] for j in keep]
        if not rows:
            break
        kv = kv.select(keep)
        kv, logits = runner.decode_step(kv, [out[i][-1] for i in rows])
        step += 1
    return [(first[i], texts[i].strip(), len(out[i])) for i in range(len(calls))]


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p, z = k / n, 1.96
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (round(c - h, 4), round(c + h, 4))


def paired(diffs: list[float]) -> dict:
    n = len(diffs)
    if n < 2:
        return {"n": n}
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    h = 1.96 * sd / math.sqrt(n)
    return {"n": n, "mean": round(m, 4), "ci95": [round(m - h, 4), round(m + h, 4)]}


def summarize(rows: list[dict], args: argparse.Namespace) -> dict:
    modes = args.modes.split(",")
    by = {(r["dataset"], r["id"], r["mode"]): r for r in rows}
    out: dict = {"datasets": {}}
    for ds in args.datasets.split(","):
        ids = sorted({i for d, i, m in by if d == ds and all((d, i, mm) in by for mm in modes)})
        entry: dict = {"num_paired": len(ids), "partial": len(ids) < args.num, "modes": {}}
        for mode in modes:
            rs = [by[(ds, i, mode)] for i in ids]
            e = {"f1": round(statistics.fmean(r["f1"] for r in rs), 4) if rs else None}
            if mode != "none" and "none" in modes and rs:
                base = [by[(ds, i, "none")] for i in ids]
                agree = sum(r["first_token"] == b["first_token"] for r, b in zip(rs, base))
                same = sum(r["answer"] == b["answer"] for r, b in zip(rs, base))
                e.update(f1_diff=paired([r["f1"] - b["f1"] for r, b in zip(rs, base)]),
                         first_token_agreement=round(agree / len(ids), 4),
                         first_token_agreement_ci95=wilson(agree, len(ids)),
                         same_answer=round(same / len(ids), 4))
            entry["modes"][mode] = e
        out["datasets"][ds] = entry
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Quantized vs unquantized answers (stuff:2)", "",
             f"{meta['machine']}, model {meta['model']}, greedy, command: `{meta['command']}`",
             f"Load average at end: {meta['load_avg']}.", "",
             "| dataset | mode | N paired | F1 | F1 - none (95% CI) | first-token agreement (95% CI) | same answer |",
             "|---|---|---:|---:|---|---|---:|"]
    for ds, entry in result["summary"]["datasets"].items():
        tag = " (partial)" if entry["partial"] else ""
        for mode, e in entry["modes"].items():
            if "f1_diff" in e:
                d = e["f1_diff"]
                diff = f"{d.get('mean')} [{d['ci95'][0]}, {d['ci95'][1]}]" if "ci95" in d else "n/a"
                agree = f"{e['first_token_agreement']:.1%} [{e['first_token_agreement_ci95'][0]:.1%}, " \
                        f"{e['first_token_agreement_ci95'][1]:.1%}]"
                same = f"{e['same_answer']:.1%}"
            else:
                diff = agree = same = "-"
            lines.append(f"| {ds}{tag} | {mode} | {entry['num_paired']} | {e['f1']} | {diff} | {agree} | {same} |")
    lines += ["", "Targets (int8): F1 within 0.01 of none (paired CI), first-token agreement >= 97%."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--datasets", default="squad,2wikimultihopqa")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--modes", default="none,int8")
    ap.add_argument("--corpus-limit", type=int, default=500)
    ap.add_argument("--batch", type=int, default=4, help="questions prefilled and decoded together")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "bench_quant"))
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows_path = stem.with_suffix(".jsonl")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["dataset"], r["id"], r["mode"]) for r in rows}
    modes = args.modes.split(",")

    if not args.summarize_only:
        from ragserve.retrieval.embeddings import Embedder
        from ragserve.retrieval.ingest import Retriever
        from ragserve.synthesis import build_program

        embedder = Embedder()
        retriever = Retriever(embedder)
        work = []   # (dataset, question, call), interleaved across datasets so both progress
        per_ds = []
        for ds in args.datasets.split(","):
            spec = get_spec(ds)
            qs = load_questions(ds)
            qs = random.Random(args.seed).sample(qs, min(args.num, len(qs)))
            base = Config(engine=EngineConfig(model=args.model))
            info = ensure_collection(ds, base, qs, corpus_limit=args.corpus_limit, embedder=embedder, progress=False)
            cfg = apply_dataset_settings(base, spec, info.collection)
            items = []
            for q in qs:
                hits, _ = retriever.retrieve(info.collection, q["question"], 2, query_filters(spec, q))
                program = build_program(q["question"], [h.chunk for h in hits], RagPlan(Method.STUFF, 2), cfg.synthesis)
                (call,) = next(program)
                items.append((ds, q, call))
            per_ds.append(items)
        for group in zip(*per_ds):
            work.extend(group)
        work += [x for items in per_ds for x in items[len(min(per_ds, key=len)):]]
        runners = {m: make_runner(args.model, m) for m in modes}
        todo = [w for w in work if any((w[0], w[1]["id"], m) not in done for m in modes)]
        logger.info("%d questions to run (%d already done)", len(todo), len(work) - len(todo))
        with open(rows_path, "a") as f:
            for start in range(0, len(todo), args.batch):
                batch = todo[start:start + args.batch]
                for mode in modes:
                    need = [w for w in batch if (w[0], w[1]["id"], mode) not in done]
                    if not need:
                        continue
                    t0 = time.perf_counter()
                    results = greedy(runners[mode], [c for _, _, c in need])
                    dt = time.perf_counter() - t0
                    for (ds, q, call), (first, text, n_out) in zip(need, results):
                        s = score(get_spec(ds), text, q["answers"])
                        row = {"dataset": ds, "id": q["id"], "mode": mode, "answer": text, "first_token": first,
                               "f1": s["f1"], "output_tokens": n_out, "batch_wall_s": round(dt, 3)}
                        rows.append(row)
                        done.add((ds, q["id"], mode))
                        f.write(json.dumps(row) + "\n")
                    f.flush()
                logger.info("%d / %d questions", min(start + args.batch, len(todo)), len(todo))

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": args.model,
            "load_avg": tuple(round(x, 2) for x in os.getloadavg()),
            "command": "python eval/bench_quant.py " + " ".join(sys.argv[1:]),
            "corpus_limit": args.corpus_limit, "seed": args.seed}
    result = {"meta": meta, "summary": summarize(rows, args)}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
