"""Embedded engine throughput: prefill tok/s at 512 and 2048 tokens, decode tok/s, and a
batched vs sequential map phase (8 calls), for each model.

    python eval/bench_engine.py [--models smollm2,qwen] [--repeats 3]

Writes eval/results/bench_engine.json and bench_engine.md.
Targets: Qwen bf16 prefill >= 900 tok/s at 512 tokens; batched map >= 3x sequential.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragserve.config import EngineConfig, datasets_dir  # noqa: E402
from ragserve.domain import LLMCall  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def passages(n: int) -> list[str]:
    out = []
    with open(datasets_dir() / "squad" / "corpus.jsonl") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


def prompt_of(runner, target_tokens: int, texts: list[str]) -> list[int]:
    """A chat prompt of exactly `target_tokens` tokens made of real passages."""
    body = "\n\n".join(texts)
    ids = runner.tokenizer.encode(body, add_special_tokens=False)
    while len(ids) < target_tokens:
        ids = ids + ids
    return ids[:target_tokens]


def bench_model(name: str, repeats: int) -> dict:
    import torch

    from ragserve.engines.local.engine import LocalEngine

    engine = LocalEngine(EngineConfig(model=name, max_batch_size=16))
    runner = engine.runner
    texts = passages(60)
    out: dict = {"model": name, "dtype": str(runner.dtype).replace("torch.", ""), "threads": torch.get_num_threads()}

    runner.prefill([prompt_of(runner, 64, texts)])    # warm-up
    for n in (512, 2048):
        ids = prompt_of(runner, n, texts)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.prefill([ids])
            times.append(time.perf_counter() - t0)
        out[f"prefill_{n}_tok_s"] = round(n / statistics.median(times), 1)

    # Decode: 64 greedy steps after a 256-token prompt, batch of 1.
    kv, logits = runner.prefill([prompt_of(runner, 256, texts)])
    token = int(logits.argmax(-1)[0])
    t0 = time.perf_counter()
    for _ in range(64):
        kv, logits = runner.decode_step(kv, [token])
        token = int(logits.argmax(-1)[0])
    out["decode_tok_s"] = round(64 / (time.perf_counter() - t0), 1)

    # Map phase: 8 summary calls over real passages, max 48 output tokens, min 48 (no early stop).
    calls = [LLMCall((("system", "Summarize the passage."), ("user", t)), max_tokens=48) for t in texts[:8]]

    async def batched() -> float:
        t0 = time.perf_counter()
        rs = await engine.generate(calls)
        return sum(r.output_tokens for r in rs) / (time.perf_counter() - t0), sum(r.prompt_tokens for r in rs)

    async def sequential() -> float:
        t0 = time.perf_counter()
        n = 0
        for c in calls:
            (r,) = await engine.generate([c])
            n += r.output_tokens
        return n / (time.perf_counter() - t0)

    (b_tok_s, prompt_tokens), s_tok_s = asyncio.run(batched()), asyncio.run(sequential())
    out.update({"map8_prompt_tokens": prompt_tokens, "map8_batched_out_tok_s": round(b_tok_s, 1),
                "map8_sequential_out_tok_s": round(s_tok_s, 1),
                "map8_speedup": round(b_tok_s / s_tok_s, 2)})
    asyncio.run(engine.close())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="smollm2,qwen")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [bench_model(m, args.repeats) for m in args.models.split(",")]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "load_avg": os.getloadavg(), "command": " ".join(sys.argv)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_engine.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Embedded engine throughput", "",
             f"{meta['machine']}, Python {meta['python']}, load average at end {tuple(round(x, 2) for x in meta['load_avg'])}.",
             f"Command: `{meta['command']}`", "",
             "| model | dtype | prefill 512 tok/s | prefill 2048 tok/s | decode tok/s | map x8 batched out tok/s "
             "| map x8 sequential out tok/s | batched speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['prefill_512_tok_s']} | {r['prefill_2048_tok_s']} | "
                     f"{r['decode_tok_s']} | {r['map8_batched_out_tok_s']} | {r['map8_sequential_out_tok_s']} | "
                     f"{r['map8_speedup']}x |")
    lines += ["", "Targets: Qwen prefill >= 900 tok/s at 512 tokens; batched map >= 3x sequential."]
    (RESULTS / "bench_engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
