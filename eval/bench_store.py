"""Vector-store benchmark: FAISS files vs Milvus Lite behind the same interface (retrieval/base.py).

    python eval/bench_store.py                       # 10k and 100k chunks, both stores, one run
    python eval/bench_store.py --sizes 10000 --queries 100

Per store and size, in a fresh data dir:
  - ingest: `add` in batches of --batch chunks (each batch one atomic commit, as `ragserve
    ingest` does per call); throughput = chunks / wall time over all batches.
  - top-k latency: `search(q, k)` wall time per query, p50/p99, unfiltered and with a doc_id
    filter (qmsum-style: one document's chunks); the query embedding is given, so embedding
    cost is not in the figures.
  - agreement: share of Milvus' top-k ids equal to FAISS' (both exact: FLAT / IndexFlatIP).

Embeddings are synthetic, not MiniLM outputs: 384-dim (all-MiniLM-L6-v2's size) unit vectors
drawn around 512 random centres (clustered like real text embeddings, so scores are not all
~0); chunk texts are SQuAD passages, made unique per chunk. Queries are stored vectors plus
noise. Writes eval/results/bench_store.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

DIM = 384
CHUNKS_PER_DOC = 20


def synthetic(n: int, seed: int = 0) -> tuple[list[Any], np.ndarray]:
    from ragserve.config import datasets_dir
    from ragserve.domain import Chunk

    texts = []
    with open(datasets_dir() / "squad/corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"][:1200])
            if len(texts) >= 2000:
                break
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((512, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, 512, n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(id=f"d{i // CHUNKS_PER_DOC}#{i % CHUNKS_PER_DOC}", doc_id=f"d{i // CHUNKS_PER_DOC}",
                    text=f"[{i}] {texts[i % len(texts)]}", num_tokens=256, title=f"doc {i // CHUNKS_PER_DOC}",
                    metadata={"source": "bench"}) for i in range(n)]
    return chunks, vectors


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_one(kind: str, n: int, chunks, vectors, queries, filters, batch: int, k: int) -> dict[str, Any]:
    from ragserve.config import RetrievalConfig
    from ragserve.retrieval.base import open_store
    from ragserve.retrieval.store import CollectionSpec

    data = Path(tempfile.mkdtemp(prefix=f"bench-store-{kind}-"))
    os.environ["RAGSERVE_DATA"] = str(data)
    try:
        cfg = RetrievalConfig(store=kind)
        store = open_store(cfg)
        spec = CollectionSpec(embedding_model="synthetic-384", dim=DIM, tokenizer="bench",
                              chunk_tokens=256, chunk_overlap_tokens=0)
        col = store.create_or_open("bench", spec)
        t0 = time.perf_counter()
        batch_s = []
        for start in range(0, n, batch):
            tb = time.perf_counter()
            col.add(chunks[start:start + batch], vectors[start:start + batch])
            batch_s.append(time.perf_counter() - tb)
        ingest_s = time.perf_counter() - t0
        col = store.open("bench")
        assert len(col) == n, (kind, len(col), n)
        col.search(queries[0], k)                           # untimed warm-up
        lat, ids = [], []
        for q in queries:
            t = time.perf_counter()
            hits = col.search(q, k)
            lat.append((time.perf_counter() - t) * 1000)
            ids.append([h.chunk.id for h in hits])
        flat = []
        for q, f in zip(queries, filters):
            t = time.perf_counter()
            col.search(q, k, filters=f)
            flat.append((time.perf_counter() - t) * 1000)
        out = {"store": kind, "num_chunks": n, "batch": batch, "k": k,
               "ingest_s": round(ingest_s, 2), "ingest_chunks_per_s": round(n / ingest_s, 1),
               "first_batch_s": round(batch_s[0], 3), "last_batch_s": round(batch_s[-1], 3),
               "search_ms": {"p50": round(pct(lat, 50), 3), "p99": round(pct(lat, 99), 3),
                             "mean": round(float(np.mean(lat)), 3), "n": len(lat)},
               "filtered_search_ms": {"p50": round(pct(flat, 50), 3), "p99": round(pct(flat, 99), 3),
                                      "mean": round(float(np.mean(flat)), 3), "n": len(flat)},
               "disk_mb": round(sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) / 2**20, 1)}
        if kind == "milvus":
            from ragserve.retrieval.milvus_store import MilvusStore

            MilvusStore.close_all()
        return out, ids
    finally:
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--stores", default="faiss,milvus")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--batch", type=int, default=5000, help="chunks per add() (one commit each)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default="eval/results/bench_store")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, agreement = [], {}
    for n in sizes:
        chunks, vectors = synthetic(n)
        rng = np.random.default_rng(1)
        picks = rng.integers(0, n, args.queries)
        queries = vectors[picks] + 0.3 * rng.standard_normal((args.queries, DIM)).astype(np.float32)
        filters = [{"doc_id": chunks[i].doc_id} for i in picks]
        ids = {}
        for kind in args.stores.split(","):
            print(f"{kind} n={n} ...", flush=True)
            row, ids[kind] = bench_one(kind, n, chunks, vectors, queries, filters, args.batch, args.k)
            print(json.dumps(row), flush=True)
            rows.append(row)
        if "faiss" in ids and "milvus" in ids:
            same = [len(set(a) & set(b)) / len(a) for a, b in zip(ids["faiss"], ids["milvus"])]
            agreement[str(n)] = round(float(np.mean(same)), 4)
    result = {"rows": rows, "topk_agreement_milvus_vs_faiss": agreement,
              "embeddings": f"synthetic unit vectors, dim {DIM} (all-MiniLM-L6-v2's), 512 clusters",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "loadavg": [round(x, 2) for x in os.getloadavg()]},
              "command": "python eval/bench_store.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Vector store: FAISS vs Milvus Lite", "",
             f"`{result['command']}` on {os.cpu_count()} CPUs (shared machine, load {result['machine']['loadavg']}). "
             f"Embeddings: {result['embeddings']}; {args.queries} queries, k={args.k}; ingest in batches of "
             f"{args.batch} chunks, one atomic commit each. Latency is `search()` only (the query embedding is given).", "",
             "| store | chunks | ingest chunks/s | search p50 ms | search p99 ms | doc_id-filtered p50 ms | filtered p99 ms | disk MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['num_chunks']} | {r['ingest_chunks_per_s']} | {r['search_ms']['p50']} | "
                     f"{r['search_ms']['p99']} | {r['filtered_search_ms']['p50']} | {r['filtered_search_ms']['p99']} | "
                     f"{r['disk_mb']} |")
    if agreement:
        lines += ["", "Top-k agreement (Milvus FLAT vs FAISS IndexFlatIP, share of equal ids): " +
                  ", ".join(f"{n}: {a}" for n, a in agreement.items())]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
