"""Tuning-sweep throughput: in process vs on Ray with 1 and 2 workers (`ragserve tune --ray local`).

    python eval/bench_ray_sweep.py                     # squad, SmolLM2, 6 questions x 3 plans

Every run sweeps the same cells into its own profile dir (one shared data dir, so the corpus
is ingested once, before anything is timed). Throughput = cells / the time from the first
cell to the last record (`meta.json` machine_load.sweep); start-up (cluster, engine loads,
warm-up) is reported apart. Each engine gets RAGSERVE_THREADS threads (default 1), so "Ray,
2 workers" uses two cores as two engines; "in process, 2 threads" is one engine on both.
Also checks that every run's records equal the first's (greedy decoding).
Writes eval/results/bench_ray_sweep.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIMING = {"latency_s", "ttft_s"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="squad")
    ap.add_argument("--num", type=int, default=6)
    ap.add_argument("--grid", default="map_rerank:1,stuff:2,stuff:4")
    ap.add_argument("--corpus-limit", type=int, default=20)
    ap.add_argument("--runs", default="local:1,local:2,ray:1,ray:2",
                    help="comma-separated MODE:N; local:N = in process with N threads, ray:N = N Ray workers")
    ap.add_argument("--out", default="eval/results/bench_ray_sweep")
    ap.add_argument("--prior", help="JSON list of rows of an earlier run of the same settings to report too")
    args = ap.parse_args()
    from ragserve.cli import main as cli

    data = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ["RAGSERVE_DATA"] = str(data / "data")
    base = ["tune", "--dataset", args.dataset, "--num", str(args.num), "--model", "smollm2", "--corpus-limit",
            str(args.corpus_limit), "--grid", args.grid, "--no-progress"]
    rows, reference = (json.loads(Path(args.prior).read_text()) if args.prior else []), None
    for run in args.runs.split(","):
        mode, n = run.split(":")
        out = data / run.replace(":", "-")
        os.environ["RAGSERVE_THREADS"] = n if mode == "local" else "1"
        extra = ["--ray", "local", "--ray-workers", n] if mode == "ray" else []
        print(f"{run} ...", flush=True)
        assert cli(base + ["--out", str(out)] + extra) == 0
        meta = json.loads((out / "meta.json").read_text())
        recs = {(r["query_id"], r["plan_str"]): {k: v for k, v in r.items() if k not in TIMING}
                for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
        reference = reference or recs
        row = {"run": run, **meta["machine_load"]["sweep"], "wall_s": meta["machine_load"]["wall_s"],
               "loadavg_start": meta["machine_load"]["loadavg_start"],
               "loadavg_end": meta["machine_load"]["loadavg_end"], "records_equal_first": recs == reference}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"rows": rows, "cpus": os.cpu_count(), "dataset": args.dataset, "num": args.num, "grid": args.grid,
              "command": "python eval/bench_ray_sweep.py " + " ".join(sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Tuning sweep: in process vs Ray workers", "",
             f"`{result['command']}`: {args.dataset}, SmolLM2, {args.num} questions x {len(args.grid.split(','))} plans "
             f"on {os.cpu_count()} CPUs (a machine shared with other jobs: see the load averages).", "",
             "| run | cells | cells/s | cells s | start-up s | load avg start -> end | records = first run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['num_cells']} | {r['cells_per_s']} | {r['cells_s']} | {r['startup_s']} | "
                     f"{r['loadavg_start'][0]} -> {r['loadavg_end'][0]} | {r['records_equal_first']} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
