"""LLMSteer benchmark: answer F1 and latency of steered vs unsteered answer calls.

    python eval/bench_steer.py --dataset squad --num 100 --model smollm2 --threads 1
    python eval/bench_steer.py --dataset squad --num 20 --model smollm2 --sweep \\
        "k=0.05,0.1,0.2;alpha=1.5,2,4;layers=all,:0.5,0.5:"

Per question: the stuff prompt over `--chunks` chunks built as in bench_blend (gold passages +
nearest corpus passages, >= `--min-context` chunk tokens), greedy decoding of up to
`--max-new-tokens` tokens stopping at a newline, through the embedded engine's own
`ModelRunner` (prefill / decode_step, with and without a `SteerRow`).

Selection: each chunk's attention scores (two query-free prefills) are computed once and
kept in the chunk KV store (`--kv-dir`); `selection_s` is that one-time cost per question's
new chunks, reported apart. Per-query latency is measured with the selection cached:

    full     prefill of the whole prompt + decode (no KV reuse): TTFT, ms per output token, total
    cached   the context's KV already resident (prefix cache / CacheBlend): prefill of the
             question only + decode -- the paper's setting, where steering's share is largest

Plain and steered runs alternate which goes first (CPU-load drift hits both alike); the
cached runs are repeated `--repeats` times and keep their fastest (the least disturbed by
other load), the full runs are single measurements.

--sweep runs no latency measurement: per question the context is prefilled once, then every
(k, alpha, layers, score) combination prefills the question steered over it and decodes (F1),
and scores the first gold answer teacher-forced (mean NLL per answer token: a continuous
signal where a small model's F1 is mostly 0). Results: eval/results/bench_steer_<dataset>_<model>.json/.md
(sweep: bench_steer_sweep_<dataset>_<model>.*); a partial.jsonl makes runs resumable.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench_blend import build_chunks, corpus_embeddings, pct, read_jsonl  # noqa: E402
from ragserve.config import SteerConfig, cache_dir, data_dir, datasets_dir  # noqa: E402
from ragserve.engines.local.blend import kv_spec  # noqa: E402
from ragserve.engines.local.kv_store import KVStore, model_fingerprint  # noqa: E402
from ragserve.engines.local.models import model_dir  # noqa: E402
from ragserve.engines.local.runner import BatchKV, ModelRunner  # noqa: E402
from ragserve.engines.local.segments import SegmentedPrompt, segment_call  # noqa: E402
from ragserve.engines.local.steer import SteerBatch, Steerer, SteerRow, head_prompt  # noqa: E402
from ragserve.metrics import best_f1, normalize_answer  # noqa: E402
from ragserve.synthesis import answer_call  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_steer")


# -- generation through the engine's runner ------------------------------------------------
def decode(runner: ModelRunner, kv: BatchKV, logits: torch.Tensor, row: SteerRow | None,
           max_new: int) -> tuple[str, int, BatchKV]:
    """Greedy decoding (as the engine: newline stops, like synthesis' answer_stop)."""
    out: list[int] = []
    text = ""
    for step in range(max_new):
        token = int(logits[0].argmax())
        if token in runner.eos_ids:
            break
        out.append(token)
        text = runner.decode(out)
        if "\n" in text.lstrip("\n"):
            text = text.lstrip("\n").split("\n")[0]
            break
        if step + 1 == max_new:
            break
        kv, logits = runner.decode_step(kv, [token], [row] if row is not None else None)
    return text.strip(), len(out), kv


def timed_answer(runner: ModelRunner, prompt: SegmentedPrompt, row: SteerRow | None, max_new: int,
                 head_kv: "HeadKV | None" = None) -> dict[str, Any]:
    """Prefill (the whole prompt, or only the question over `head_kv`) + decode, timed."""
    ids = list(prompt.token_ids)
    t0 = time.perf_counter()
    if head_kv is None:
        kv, logits = runner.prefill([ids], [row] if row is not None else None)
    else:
        kv, logits = runner.extend(head_kv.cache, ids, head_kv.size_tokens, row)
    int(logits[0].argmax())
    ttft = time.perf_counter() - t0
    answer, n, kv = decode(runner, kv, logits, row, max_new)
    total = time.perf_counter() - t0
    if head_kv is not None:   # roll the shared context cache back for the next run
        head_kv.rollback()
    return {"answer": answer, "ttft_s": round(ttft, 4), "total_s": round(total, 4), "output_tokens": n,
            "decode_ms_per_token": round(1000 * (total - ttft) / max(1, n - 1), 2) if n > 1 else None}


class HeadKV:
    """The context's KV (prompt without the question), prefilled once and shared by runs."""

    def __init__(self, runner: ModelRunner, prompt: SegmentedPrompt) -> None:
        head = head_prompt(prompt)
        kv, _ = runner.prefill([list(head.token_ids)])
        self.cache = kv.cache
        self.size_tokens = len(head)

    def rollback(self) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :self.size_tokens]
            layer.values = layer.values[:, :, :self.size_tokens]


@torch.inference_mode()
def answer_nll(runner: ModelRunner, prompt: SegmentedPrompt, head: HeadKV, row: SteerRow | None,
               answer: list[int]) -> float:
    """Mean NLL per token of `answer` right after the prompt (teacher-forced, question and
    answer steered as in decoding), over the shared context KV."""
    ids = list(prompt.token_ids) + answer
    n, start = len(ids), head.size_tokens
    batch = SteerBatch.build([row], [n], n, n - start) if row is not None else None
    out = runner.model(input_ids=torch.tensor([ids[start:]]), position_ids=torch.arange(start, n).view(1, -1),
                       past_key_values=head.cache, use_cache=True, **({"steer": batch} if batch else {}))
    head.rollback()
    logits = out.logits[0, -len(answer) - 1:-1].float()                     # predicts each answer token
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer)))


# -- setup -----------------------------------------------------------------------------------
def load(args: argparse.Namespace) -> tuple[ModelRunner, Steerer, list[dict], Any]:
    torch.set_num_threads(args.threads)
    runner = ModelRunner(model_dir(args.model), args.model, args.threads, "fp32")
    model_id = model_fingerprint(model_dir(args.model), args.model, runner.dtype)
    store = KVStore(Path(args.kv_dir), kv_spec(runner.model, model_id), ram_budget_bytes=256 * 2**20)
    steerer = Steerer(runner.model, runner.tokenizer, store, steer_config(args))
    root = datasets_dir() / args.dataset
    questions = read_jsonl(root / "questions.jsonl", args.num)
    corpus = read_jsonl(root / "corpus.jsonl")
    index = {p["id"]: i for i, p in enumerate(corpus)}
    vectors = corpus_embeddings(args.dataset, corpus, Path(args.cache_dir))
    from ragserve.retrieval.embeddings import Embedder

    qvecs = Embedder().encode([q["question"] for q in questions])

    def prompt_of(qi: int) -> SegmentedPrompt:
        q = questions[qi]
        chunks = build_chunks(q, corpus, index, vectors @ qvecs[qi], runner.tokenizer, args.chunks, args.min_context)
        prompt = segment_call(runner.tokenizer, answer_call(q["question"], chunks, args.max_new_tokens, stop=("\n",)))
        assert prompt is not None, "the answer prompt did not segment"
        return prompt
    return runner, steerer, questions, prompt_of


def steer_config(args: argparse.Namespace) -> SteerConfig:
    return SteerConfig(enabled=True, top_fraction=args.k, alpha=args.alpha, layers=args.layers, score=args.score)


def resume(partial: Path, setup: str, qids: set[str]) -> list[dict]:
    rows = read_jsonl(partial) if partial.is_file() else []
    rows = [r for r in rows if r.get("setup") == setup and r["id"] in qids]
    if rows:
        logger.info("resuming: %d questions already measured in %s", len(rows), partial)
    return rows


def select_scores(steerer: Steerer, prompt: SegmentedPrompt) -> float:
    """One-time selection cost of the prompt's chunks not yet in the store (0 when cached)."""
    before = steerer.counters.score_s
    steerer.precompute(prompt)
    return steerer.counters.score_s - before


# -- main benchmark --------------------------------------------------------------------------
def run(args: argparse.Namespace, stem: Path) -> dict:
    runner, steerer, questions, prompt_of = load(args)
    cfg = steer_config(args)
    partial = stem.with_suffix(".partial.jsonl")
    setup = (f"{args.model}/{args.chunks}/{args.min_context}/{args.max_new_tokens}/{args.k}/{args.alpha}/"
             f"{args.layers}/{args.score}")
    rows = resume(partial, setup, {q["id"] for q in questions})
    done = {r["id"] for r in rows}
    t_start = time.perf_counter()
    for qi, q in enumerate(questions):
        if q["id"] in done:
            continue
        prompt = prompt_of(qi)
        selection_s = select_scores(steerer, prompt)
        t0 = time.perf_counter()
        row = steerer.row(prompt, cfg)                      # store lookup + top-k: per query
        row_s = time.perf_counter() - t0
        assert row is not None
        head = HeadKV(runner, prompt)
        runs: dict[str, dict] = {}
        order = [("plain", None), ("steer", row)] if qi % 2 == 0 else [("steer", row), ("plain", None)]
        for name, r in order:
            runs[f"{name}_full"] = timed_answer(runner, prompt, r, args.max_new_tokens)
        for _ in range(args.repeats):
            for name, r in order:
                res = timed_answer(runner, prompt, r, args.max_new_tokens, head)
                best = runs.get(f"{name}_cached")
                runs[f"{name}_cached"] = res if best is None else {
                    **res, **{k: min(res[k], best[k]) for k in ("ttft_s", "total_s", "decode_ms_per_token")
                              if res[k] is not None and best[k] is not None}}
        runs["steer_full"]["row_s"] = runs["steer_cached"]["row_s"] = round(row_s, 4)
        for m in runs.values():
            m["f1"] = round(best_f1(m["answer"], q["answers"]), 4)
        out = {"id": q["id"], "setup": setup, "question": q["question"], "answers": q["answers"],
               "num_tokens": len(prompt), "num_question_tokens": len(prompt) - head.size_tokens,
               "num_chunk_tokens": prompt.num_chunk_tokens, "num_steered_tokens": row.num_steered,
               "selection_s": round(selection_s, 3), "runs": runs,
               "same_answer": normalize_answer(runs["plain_full"]["answer"]) == normalize_answer(runs["steer_full"]["answer"])}
        rows.append(out)
        with open(partial, "a") as f:
            f.write(json.dumps(out) + "\n")
        logger.info("q%d/%d %d tok: plain %r f1 %.2f | steer %r f1 %.2f | ttft %.2f/%.2fs (%.0fs)", qi + 1,
                    len(questions), len(prompt), runs["plain_full"]["answer"], runs["plain_full"]["f1"],
                    runs["steer_full"]["answer"], runs["steer_full"]["f1"], runs["plain_full"]["ttft_s"],
                    runs["steer_full"]["ttft_s"], time.perf_counter() - t_start)
    return summarize(args, rows, steerer)


def _ratio(rows: list[dict], key: str, steer: str, plain: str) -> dict[str, float] | None:
    pairs = [(r["runs"][steer][key], r["runs"][plain][key]) for r in rows
             if r["runs"][steer][key] is not None and r["runs"][plain][key] is not None]
    if not pairs:
        return None
    return {"median_ratio": round(statistics.median(s / p for s, p in pairs), 4),
            "ratio_of_means": round(sum(s for s, _ in pairs) / sum(p for _, p in pairs), 4)}


def summarize(args: argparse.Namespace, rows: list[dict], steerer: Steerer) -> dict:
    summary: dict[str, dict] = {}
    for name in ("plain_full", "steer_full", "plain_cached", "steer_cached"):
        runs = [r["runs"][name] for r in rows]
        per_tok = [m["decode_ms_per_token"] for m in runs if m["decode_ms_per_token"] is not None]
        summary[name] = {"f1_mean": round(statistics.mean(m["f1"] for m in runs), 4),
                         "ttft_median_s": round(statistics.median(m["ttft_s"] for m in runs), 4),
                         "total_median_s": round(statistics.median(m["total_s"] for m in runs), 4),
                         "total_p90_s": round(pct([m["total_s"] for m in runs], 0.9), 4),
                         "decode_ms_per_token_median": round(statistics.median(per_tok), 2) if per_tok else None,
                         "output_tokens_mean": round(statistics.mean(m["output_tokens"] for m in runs), 2)}
    added = {}
    for where in ("full", "cached"):
        for key in ("ttft_s", "total_s", "decode_ms_per_token"):
            added[f"{where}_{key}"] = _ratio(rows, key, f"steer_{where}", f"plain_{where}")
    f1_plain = [r["runs"]["plain_full"]["f1"] for r in rows]
    f1_steer = [r["runs"]["steer_full"]["f1"] for r in rows]
    sel = [r["selection_s"] for r in rows if r["selection_s"] > 0]
    return {
        "dataset": args.dataset, "model": args.model, "dtype": "float32", "num": len(rows),
        "steer": {"top_fraction": args.k, "alpha": args.alpha, "layers": args.layers, "score": args.score},
        "chunks": args.chunks, "min_context": args.min_context, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "repeats": args.repeats,
        "prompt_tokens_mean": round(statistics.mean(r["num_tokens"] for r in rows), 1),
        "question_tokens_mean": round(statistics.mean(r["num_question_tokens"] for r in rows), 1),
        "steered_tokens_mean": round(statistics.mean(r["num_steered_tokens"] for r in rows), 1),
        "f1_plain": round(statistics.mean(f1_plain), 4), "f1_steer": round(statistics.mean(f1_steer), 4),
        "f1_delta": round(statistics.mean(f1_steer) - statistics.mean(f1_plain), 4),
        "num_improved": sum(s > p for s, p in zip(f1_steer, f1_plain)),
        "num_worse": sum(s < p for s, p in zip(f1_steer, f1_plain)),
        "same_answer_rate": round(statistics.mean(r["same_answer"] for r in rows), 3),
        "selection_s_per_question_median": round(statistics.median(sel), 3) if sel else 0.0,
        "selection_s_per_chunk_token": round(sum(sel) / max(1, sum(r["num_chunk_tokens"] for r in rows if r["selection_s"] > 0)) * 1000, 3),
        "row_ms_median": round(1000 * statistics.median(r["runs"]["steer_full"]["row_s"] for r in rows), 2),
        "added_latency": added, "summary": summary, "steer_counters": steerer.counters.as_dict(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_end": os.getloadavg()},
        "rows": rows,
    }


def markdown(result: dict) -> str:
    s, a = result["summary"], result["added_latency"]

    def over(key: str) -> str:
        v = a.get(key)
        return f"{100 * (v['median_ratio'] - 1):+.1f}% (means {100 * (v['ratio_of_means'] - 1):+.1f}%)" if v else "n/a"

    st = result["steer"]
    lines = [f"# LLMSteer benchmark: {result['dataset']}, {result['model']} {result['dtype']}", "",
             f"N = {result['num']} questions, {result['chunks']} chunks, prompt tokens mean {result['prompt_tokens_mean']} "
             f"(question + template tail {result['question_tokens_mean']}), {result['threads']} thread(s). "
             f"Steering: top_fraction {st['top_fraction']}, alpha {st['alpha']}, layers {st['layers']}, "
             f"score {st['score']}; "
             f"{result['steered_tokens_mean']} prompt tokens steered toward on average (any layer).", "",
             f"**F1: {result['f1_plain']} unsteered -> {result['f1_steer']} steered ({result['f1_delta']:+.4f}; "
             f"{result['num_improved']} questions better, {result['num_worse']} worse; same answer "
             f"{100 * result['same_answer_rate']:.0f}%).**", "",
             "| run | F1 | TTFT median (s) | total median (s) | total p90 (s) | decode ms/token | output tokens |",
             "|---|---|---|---|---|---|---|"]
    for name, m in s.items():
        lines.append(f"| {name} | {m['f1_mean']} | {m['ttft_median_s']} | {m['total_median_s']} | {m['total_p90_s']} | "
                     f"{m['decode_ms_per_token_median']} | {m['output_tokens_mean']} |")
    lines += ["", "Added latency of steering (selection cached; median of per-question ratios, ratio of means):", "",
              "| | TTFT | decode per token | total |", "|---|---|---|---|",
              f"| full prefill per query | {over('full_ttft_s')} | {over('full_decode_ms_per_token')} | {over('full_total_s')} |",
              f"| context KV cached | {over('cached_ttft_s')} | {over('cached_decode_ms_per_token')} | {over('cached_total_s')} |",
              "", f"Full runs: one measurement each; cached runs: fastest of {result['repeats']}.",
              "", f"Per-query steering-set build (store lookup + top-k): median {result['row_ms_median']} ms, "
              f"inside the steered runs' time. One-time selection (two query-free prefills per new chunk): "
              f"median {result['selection_s_per_question_median']} s per question, "
              f"{result['selection_s_per_chunk_token']} ms per chunk token.", "",
              f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs, torch "
              f"{result['machine']['torch']}, load average at the end {result['machine']['loadavg_end']}.", ""]
    return "\n".join(lines)


# -- knob sweep ---------------------------------------------------------------------------------
def parse_grid(text: str) -> list[SteerConfig]:
    """"k=0.05,0.1;alpha=2,4;layers=all,0.5:;score=sum,mean" -> every combination."""
    axes = {"k": ["0.1"], "alpha": ["2"], "layers": ["all"], "score": ["sum"]}
    for part in filter(None, text.split(";")):
        name, _, values = part.partition("=")
        if name.strip() not in axes:
            raise SystemExit(f"--sweep axis {name!r}: use k, alpha, layers, score")
        axes[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return [SteerConfig(enabled=True, top_fraction=float(k), alpha=float(al), layers=ly, score=sc)
            for k, al, ly, sc in itertools.product(axes["k"], axes["alpha"], axes["layers"], axes["score"])]


def config_name(cfg: SteerConfig) -> str:
    return f"k={cfg.top_fraction:g} alpha={cfg.alpha:g} layers={cfg.layers} score={cfg.score}"


def run_sweep(args: argparse.Namespace, stem: Path) -> dict:
    runner, steerer, questions, prompt_of = load(args)
    grid = parse_grid(args.sweep)
    partial = stem.with_suffix(".partial.jsonl")
    setup = f"{args.model}/{args.chunks}/{args.min_context}/{args.max_new_tokens}/{args.sweep}"
    rows = resume(partial, setup, {q["id"] for q in questions})
    done = {r["id"] for r in rows}
    for qi, q in enumerate(questions):
        if q["id"] in done:
            continue
        prompt = prompt_of(qi)
        select_scores(steerer, prompt)
        head = HeadKV(runner, prompt)
        gold = runner.tokenizer(q["answers"][0], add_special_tokens=False)["input_ids"]

        def measure(row: SteerRow | None) -> dict[str, Any]:
            res = timed_answer(runner, prompt, row, args.max_new_tokens, head)
            return {"answer": res["answer"], "f1": round(best_f1(res["answer"], q["answers"]), 4),
                    "nll": round(answer_nll(runner, prompt, head, row, gold), 4)}
        out = {"id": q["id"], "setup": setup, "answers": q["answers"], "num_tokens": len(prompt),
               "plain": measure(None), "configs": {}}
        for cfg in grid:
            out["configs"][config_name(cfg)] = measure(steerer.row(prompt, cfg))
        rows.append(out)
        with open(partial, "a") as f:
            f.write(json.dumps(out) + "\n")
        best = max(out["configs"].items(), key=lambda kv: kv[1]["f1"])
        logger.info("q%d/%d plain f1 %.2f, best %s %.2f", qi + 1, len(questions), out["plain"]["f1"], best[0], best[1]["f1"])
    plain = statistics.mean(r["plain"]["f1"] for r in rows)
    plain_nll = statistics.mean(r["plain"]["nll"] for r in rows)
    table = []
    for cfg in grid:
        name = config_name(cfg)
        f1 = [r["configs"][name]["f1"] for r in rows]
        nll = [r["configs"][name]["nll"] for r in rows]
        table.append({"config": name, "top_fraction": cfg.top_fraction, "alpha": cfg.alpha, "layers": cfg.layers,
                      "score": cfg.score, "f1_mean": round(statistics.mean(f1), 4),
                      "f1_delta": round(statistics.mean(f1) - plain, 4),
                      "num_improved": sum(s > r["plain"]["f1"] for s, r in zip(f1, rows)),
                      "num_worse": sum(s < r["plain"]["f1"] for s, r in zip(f1, rows)),
                      "nll_mean": round(statistics.mean(nll), 4), "nll_delta": round(statistics.mean(nll) - plain_nll, 4),
                      "num_nll_lower": sum(s < r["plain"]["nll"] for s, r in zip(nll, rows))})
    table.sort(key=lambda t: (-t["f1_mean"], t["nll_mean"]))
    return {"dataset": args.dataset, "model": args.model, "num": len(rows), "chunks": args.chunks,
            "min_context": args.min_context, "f1_plain": round(plain, 4), "nll_plain": round(plain_nll, 4),
            "grid": args.sweep, "table": table, "rows": rows}


def sweep_markdown(result: dict) -> str:
    lines = [f"# LLMSteer knob sweep: {result['dataset']}, {result['model']}", "",
             f"N = {result['num']} questions, {result['chunks']} chunks (>= {result['min_context']} chunk tokens); "
             f"context KV shared, question prefilled steered. Unsteered: F1 {result['f1_plain']}, gold-answer "
             f"NLL {result['nll_plain']} nats/token (lower is better).", "",
             "| top_fraction | alpha | layers | score | F1 | F1 delta | better | worse | gold NLL | NLL delta | NLL lower |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in result["table"]:
        lines.append(f"| {t['top_fraction']:g} | {t['alpha']:g} | {t['layers']} | {t['score']} | {t['f1_mean']} | "
                     f"{t['f1_delta']:+.4f} | {t['num_improved']} | {t['num_worse']} | {t['nll_mean']} | "
                     f"{t['nll_delta']:+.4f} | {t['num_nll_lower']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="squad", choices=["squad", "2wikimultihopqa"])
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--min-context", type=int, default=300, help="chunk tokens per prompt, at least")
    p.add_argument("--max-new-tokens", type=int, default=24)
    d = SteerConfig()
    p.add_argument("--k", type=float, default=d.top_fraction, help="steer.top_fraction")
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--layers", default=d.layers)
    p.add_argument("--score", default=d.score, choices=["sum", "mean"])
    p.add_argument("--sweep", default=None, help='knob grid, e.g. "k=0.05,0.1;alpha=2,4;layers=all,0.5:"')
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="cached-context runs: keep the fastest of N")
    p.add_argument("--kv-dir", default=str(data_dir() / "kv"), help="chunk KV store (steering scores)")
    p.add_argument("--cache-dir", default=str(cache_dir() / "bench_blend"), help="corpus embeddings")
    p.add_argument("--out", default=None, help="output stem (default eval/results/bench_steer[_sweep]_<dataset>_<model>)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    kind = "bench_steer_sweep" if args.sweep else "bench_steer"
    stem = Path(args.out) if args.out else RESULTS / f"{kind}_{args.dataset}_{args.model}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = run_sweep(args, stem) if args.sweep else run(args, stem)
    text = sweep_markdown(result) if args.sweep else markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".partial.jsonl").unlink(missing_ok=True)   # its rows are in the JSON now
    print(text)


if __name__ == "__main__":
    main()
