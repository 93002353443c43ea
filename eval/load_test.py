"""Bounded load test of the HTTP server: N concurrent clients for a fixed duration.

    python eval/load_test.py                         # starts its own server (SmolLM2, 127.0.0.1)
    python eval/load_test.py --url http://127.0.0.1:8000 --collection docs

Each of `--concurrency` clients (default 32) loops for `--duration` seconds (default 60):
POST /v1/query with a squad question under a fixed plan (default stuff:2; `--plan metis`
lets METIS plan each query: a profiler call more per query); on 503 it
waits the Retry-After the server sent (at most what is left of the run), like a polite
client. After the deadline no request starts; those in flight finish (client timeout
`--timeout`). Everything is sent to the one server on loopback; the loop stops by itself.

Counts every request's outcome. Pass criteria: 0 lost requests (connection
errors, client timeouts), 0 5xx other than 503 with Retry-After. Reports p50/p95/p99
latency and TTFT of answered queries and throughput, plus the server's /v1/stats.
Writes eval/results/load_test.json and eval/results/load_test.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "eval" / "results"
sys.path.insert(0, str(ROOT))

from ragserve.config import datasets_dir  # noqa: E402

API_KEY = "load-test-key"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def squad(num_passages: int, seed: int) -> tuple[list[dict], list[str]]:
    """The first `num_passages` squad passages and the questions answerable from them."""
    root = datasets_dir() / "squad"
    passages = []
    with open(root / "corpus.jsonl") as f:
        for line in f:
            passages.append(json.loads(line))
            if len(passages) >= num_passages:
                break
    ids = {p["id"] for p in passages}
    questions = [q["question"] for q in map(json.loads, open(root / "questions.jsonl"))
                 if set(q["corpus_ids"]) <= ids]
    random.Random(seed).shuffle(questions)
    return [{"id": p["id"], "title": p["title"], "text": p["text"]} for p in passages], questions


class OwnServer:
    """`ragserve serve` in a subprocess on a free loopback port with a temporary data dir."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="ragserve-load-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {"engine": {"model": args.model},
                       "synthesis": {"answer_tokens": args.answer_tokens},
                       "metis": {"feedback_every": 0},
                       "server": {"api_keys": [API_KEY], "max_queue": args.max_queue,
                                  "request_timeout_s": args.server_timeout, "retry_after_s": 2.0}}
        config_path = Path(self.tmp.name) / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = Path(self.tmp.name) / "server.log"
        env = {**os.environ, "RAGSERVE_DATA": str(Path(self.tmp.name) / "data"), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ragserve.cli", "serve", "--config", str(config_path),
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=env, cwd=ROOT, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("server not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()


class Run:
    """Outcomes of every request of the run."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.lost: list[str] = []                 # no HTTP answer: connection error or client timeout
        self.bad_5xx: list[str] = []              # 5xx other than 503 with Retry-After
        self.latency_s: list[float] = []          # answered (200) queries, client-side
        self.ttft_s: list[float] = []             # server-side, from the response timings
        self.plans: Counter[str] = Counter()
        self.sent = 0


async def client_loop(client: httpx.AsyncClient, run: Run, questions: list[str], args: argparse.Namespace,
                      deadline: float, worker: int) -> None:
    rng = random.Random(worker)
    while time.monotonic() < deadline:
        body: dict[str, Any] = {"query": rng.choice(questions), "collection": args.collection}
        if args.plan and args.plan != "metis":
            body["plan"] = args.plan
        run.sent += 1
        t0 = time.perf_counter()
        try:
            response = await client.post("/v1/query", json=body)
        except httpx.HTTPError as exc:
            run.lost.append(f"{type(exc).__name__}: {exc}")
            continue
        status = response.status_code
        run.statuses[str(status)] += 1
        if status == 200:
            data = response.json()
            run.latency_s.append(time.perf_counter() - t0)
            run.ttft_s.append(data["timings"]["ttft_s"])
            run.plans[f"{data['plan']['method']}:{data['plan']['num_chunks']}"] += 1
        elif status == 503 and response.headers.get("retry-after"):
            wait = float(response.headers["retry-after"])
            await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        elif status >= 500:
            run.bad_5xx.append(f"{status}: {response.text[:200]}")


async def drive(url: str, questions: list[str], args: argparse.Namespace) -> tuple[Run, float]:
    run = Run()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits, headers=headers) as client:
        t0 = time.monotonic()
        deadline = t0 + args.duration
        await asyncio.gather(*(client_loop(client, run, questions, args, deadline, i)
                               for i in range(args.concurrency)))
        elapsed = time.monotonic() - t0
    return run, elapsed


def report(run: Run, elapsed: float, args: argparse.Namespace, server: dict[str, Any], stats: dict) -> dict:
    answered = run.statuses.get("200", 0)
    return {
        "config": {"concurrency": args.concurrency, "duration_s": args.duration, "plan": args.plan,
                   "client_timeout_s": args.timeout, "server": server},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "requests": {"sent": run.sent, "answered": answered, "statuses": dict(run.statuses),
                     "lost": len(run.lost), "bad_5xx": len(run.bad_5xx)},
        "pass": {"no_lost_requests": not run.lost, "no_5xx_but_503_with_retry_after": not run.bad_5xx},
        "latency_s": {"p50": percentile(run.latency_s, 0.5), "p95": percentile(run.latency_s, 0.95),
                      "p99": percentile(run.latency_s, 0.99), "max": percentile(run.latency_s, 1.0)},
        "ttft_s": {"p50": percentile(run.ttft_s, 0.5), "p95": percentile(run.ttft_s, 0.95)},
        "throughput_qps": round(answered / elapsed, 4) if elapsed else 0.0,
        "elapsed_s": round(elapsed, 1),
        "plans": dict(run.plans),
        "server_stats_at_end": stats,
        "examples": {"lost": run.lost[:5], "bad_5xx": run.bad_5xx[:5]},
    }


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    r, lat, ttft = result["requests"], result["latency_s"], result["ttft_s"]
    cfg = result["config"]
    lines = [
        "# Load test (eval/load_test.py)", "",
        f"{cfg['concurrency']} concurrent clients for {cfg['duration_s']} s against one server "
        f"(plan: {cfg['plan']}; server: {json.dumps(cfg['server'])}); "
        f"{result['machine']['cpus']} CPUs, load average {result['machine']['load_avg_1m_at_end']} at the end.", "",
        "| metric | value |", "|---|---|",
        f"| requests sent | {r['sent']} |",
        f"| answered (200) | {r['answered']} |",
        f"| statuses | {', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} |",
        f"| lost (no HTTP answer) | {r['lost']} |",
        f"| 5xx other than 503 + Retry-After | {r['bad_5xx']} |",
        f"| latency p50 / p95 / p99 (s) | {lat['p50']} / {lat['p95']} / {lat['p99']} |",
        f"| TTFT p50 / p95 (s) | {ttft['p50']} / {ttft['p95']} |",
        f"| throughput (answered/s) | {result['throughput_qps']} |",
        f"| wall time incl. drain (s) | {result['elapsed_s']} |",
        f"| plans run | {', '.join(f'{k}: {v}' for k, v in sorted(result['plans'].items()))} |", "",
        f"Pass: no lost requests = {result['pass']['no_lost_requests']}, "
        f"no 5xx but 503 with Retry-After = {result['pass']['no_5xx_but_503_with_retry_after']}.", "",
        "503s are the admission bound at work (server.max_queue): rejected clients wait the "
        "Retry-After and try again, so the server never holds more than max_queue queries.", "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running server; default: start one")
    p.add_argument("--api-key", help="API key for --url servers that require one for queries")
    p.add_argument("--collection", default="squad-load")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which requests start")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request (s)")
    p.add_argument("--plan", default="stuff:2", help="fixed plan METHOD:NUM_CHUNKS[:INTER], or 'metis'")
    p.add_argument("--passages", type=int, default=40, help="squad passages ingested (own server)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-queue", type=int, default=8, help="server.max_queue (own server)")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--server-timeout", type=float, default=300.0, help="server.request_timeout_s (own server)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "load_test.json"))
    args = p.parse_args()
    if not 1 <= args.concurrency <= 256 or not 0 < args.duration <= 3600:
        p.error("concurrency must be in [1, 256] and duration in (0, 3600] s")

    passages, questions = squad(args.passages, args.seed)
    own = None
    url = args.url
    server_info: dict[str, Any] = {"url": "given"}
    if url is None:
        own = OwnServer(args)
        url = own.url
        print(f"starting a server on {url} ...", flush=True)
        own.wait_ready()
        server_info = own.config["server"] | {"model": args.model, "answer_tokens": args.answer_tokens}
        server_info.pop("api_keys")
        response = httpx.post(f"{url}/v1/collections/{args.collection}/documents", json={"documents": passages},
                              headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600)
        response.raise_for_status()
        print(f"ingested {len(passages)} passages; {len(questions)} questions", flush=True)
    try:
        print(f"{args.concurrency} clients for {args.duration:.0f} s ...", flush=True)
        run, elapsed = asyncio.run(drive(url, questions, args))
        stats = httpx.get(url + "/v1/stats", timeout=60).json()
    finally:
        if own is not None:
            own.stop()
    result = report(run, elapsed, args, server_info, stats)
    write(result, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0 if all(result["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
