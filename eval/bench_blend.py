"""CacheBlend benchmark: TTFT and answer quality of blended prefill vs full prefill.

    python eval/bench_blend.py --dataset squad --num 10 --chunks 6 --model qwen
    python eval/bench_blend.py --dataset 2wikimultihopqa --num 100 --chunks 6 --model qwen

Per question: the stuff prompt (`prompts.ANSWER`, via `synthesis.answer_call`) over `--chunks`
chunks of >= `--min-context` tokens in total, built from the question's gold passages plus the
corpus passages closest to the question (all-MiniLM-L6-v2 cosine, `ragserve.retrieval.embeddings`);
passages are packed in rank order into chunks of about min_context/chunks tokens, golds that
rank lower are inserted at a seeded position. Every mode prefills the *same* token ids
(`segments.segment_call`, equal to the chat template's) and greedy-decodes up to
`--max-new-tokens` tokens, stopping at a newline.

Modes:
    full_prefill      HF forward over the whole prompt
    prefix_cache      reuse the longest cached prefix in 16-token blocks (vLLM automatic prefix
                      caching): the cache holds the system prefix and every earlier prompt
    full_reuse        blend with r = 0: stored chunk KV, only glue and question computed
    blend_<mode>_r<N> blend recomputing N% of the reused tokens, single check layer (LMCache)
                      or gradual filtering (the paper)

Chunk KVs are precomputed (and stored on disk) before anything is timed. TTFT is from the
start of prefill to the first token's logits, with the prompt's chunk KV already in RAM; it
includes laying the KV out over the prompt and rotating keys. `kv_load` is separate: the
same chunk KVs read back from the disk tier (RAM tier emptied first), checksums included.

Writes eval/results/bench_blend_<dataset>.json and .md. `--combine A.json B.json --out STEM`
summarizes several finished runs' rows together (no model is run).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from ragserve.config import BlendConfig, cache_dir, data_dir, datasets_dir  # noqa: E402
from ragserve.domain import Chunk  # noqa: E402
from ragserve.engines.local.blend import Blender, kv_spec, to_cache  # noqa: E402
from ragserve.engines.local.kv_store import KVStore, model_fingerprint  # noqa: E402
from ragserve.engines.local.models import model_dir  # noqa: E402
from ragserve.engines.local.segments import SegmentedPrompt, segment_call  # noqa: E402
from ragserve.metrics import best_f1, normalize_answer  # noqa: E402
from ragserve.synthesis import answer_call  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16   # vLLM's default KV block size: prefix caching reuses whole blocks
logger = logging.getLogger("bench_blend")


# -- data -------------------------------------------------------------------------------
def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def corpus_embeddings(dataset: str, corpus: list[dict], cache: Path) -> np.ndarray:
    from ragserve.retrieval.embeddings import Embedder

    path = cache / f"{dataset}-minilm-{len(corpus)}.npy"
    if path.is_file():
        return np.load(path)
    t0 = time.perf_counter()
    vectors = Embedder().encode([f"{p['title']}\n{p['text']}" for p in corpus], batch_size=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    logger.info("embedded %d passages of %s in %.0fs", len(corpus), dataset, time.perf_counter() - t0)
    return vectors


def build_chunks(q: dict, corpus: list[dict], index: dict[str, int], scores: np.ndarray, tok: Any,
                 num_chunks: int, min_context: int) -> list[Chunk]:
    """Gold passages + nearest passages, packed in rank order into `num_chunks` chunks."""
    rng = random.Random(q["id"])
    gold = [index[c] for c in q["corpus_ids"] if c in index]
    ranked = [int(i) for i in np.argsort(-scores) if int(i) not in gold]
    order = ranked[: num_chunks * 8]
    for g in gold:   # a gold passage keeps its rank if it is near the top, else lands at random
        rank = int((scores > scores[g]).sum())
        order.insert(rank if rank < len(order) else rng.randrange(len(order) + 1), g)
    target = -(-min_context // num_chunks)
    chunks: list[Chunk] = []
    ids: list[str] = []
    texts: list[str] = []
    size = total = 0
    for i in order:
        p = corpus[i]
        texts.append(f"{p['title']}\n{p['text']}")
        ids.append(p["id"])
        size += len(tok(texts[-1] + "\n\n", add_special_tokens=False)["input_ids"])
        # close a chunk near the target; the last one closes once the context is long enough
        last = len(chunks) == num_chunks - 1
        if (not last and size >= 0.8 * target) or (last and total + size >= 1.02 * min_context):
            chunks.append(Chunk(id="+".join(ids), doc_id=ids[0], text="\n\n".join(texts), num_tokens=size))
            total += size
            ids, texts, size = [], [], 0
            if len(chunks) == num_chunks:
                break
    missing = [g for g in gold if not any(corpus[g]["id"] in c.id.split("+") for c in chunks)]
    if missing:   # a gold passage fell past the last chunk: swap it into a random chunk's place
        for g in missing:
            j = rng.randrange(len(chunks))
            p = corpus[g]
            text = f"{p['title']}\n{p['text']}"
            chunks[j] = Chunk(id=p["id"] + "+" + chunks[j].id, doc_id=p["id"], text=text + "\n\n" + chunks[j].text,
                              num_tokens=chunks[j].num_tokens)
    return chunks


# -- generation ---------------------------------------------------------------------------
def eos_ids(model: Any, tok: Any) -> set[int]:
    ids = set()
    gen = model.generation_config.eos_token_id
    ids.update([gen] if isinstance(gen, int) else (gen or []))
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id:
            ids.add(tid)
    return ids


@torch.inference_mode()
def greedy(model: Any, tok: Any, cache: DynamicCache, logits: torch.Tensor, num_tokens: int,
           max_new: int, eos: set[int]) -> str:
    out: list[int] = []
    text = ""
    for step in range(max_new):
        token = int(logits.argmax())
        if token in eos:
            break
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        if "\n" in text.lstrip("\n"):
            text = text.lstrip("\n").split("\n")[0]
            break
        if step + 1 == max_new:
            break
        res = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                    position_ids=torch.tensor([[num_tokens + step]]), use_cache=True)
        logits = res.logits[0, -1].float()
    return text.strip()


@dataclass
class Prefill:
    cache: DynamicCache
    logits: torch.Tensor
    ttft_s: float
    extra: dict


@torch.inference_mode()
def hf_prefill(model: Any, ids: tuple[int, ...], past: DynamicCache | None = None, start: int = 0) -> Prefill:
    cache = past if past is not None else DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([ids[start:]]), past_key_values=cache, use_cache=True,
                position_ids=torch.arange(start, len(ids)).view(1, -1), logits_to_keep=1)
    logits = out.logits[0, -1].float()
    int(logits.argmax())
    return Prefill(cache, logits, time.perf_counter() - t0, {"reused_tokens": start})


class PrefixCache:
    """Token-prefix KV cache over whole prompts (what automatic prefix caching reuses)."""

    def __init__(self, max_entries: int = 8) -> None:
        self.entries: list[tuple[tuple[int, ...], list, list]] = []
        self.max_entries = max_entries

    def add(self, ids: tuple[int, ...], cache: DynamicCache) -> None:
        keys = [layer.keys[:, :, : len(ids)].clone() for layer in cache.layers]
        values = [layer.values[:, :, : len(ids)].clone() for layer in cache.layers]
        self.entries.append((ids, keys, values))
        self.entries = self.entries[-self.max_entries:]

    def lookup(self, ids: tuple[int, ...]) -> tuple[int, DynamicCache | None]:
        best, best_entry = 0, None
        for entry in self.entries:
            cached = entry[0]
            n = 0
            limit = min(len(cached), len(ids) - 1)
            while n < limit and cached[n] == ids[n]:
                n += 1
            n = n // BLOCK * BLOCK
            if n > best:
                best, best_entry = n, entry
        if best_entry is None:
            return 0, None
        _, keys, values = best_entry
        return best, to_cache([k[:, :, :best].clone() for k in keys], [v[:, :, :best].clone() for v in values])


# -- the benchmark -------------------------------------------------------------------------
def modes(ratios: list[float], only: list[str] | None = None) -> list[tuple[str, BlendConfig | None]]:
    """The modes to run; `only` keeps those whose name starts with one of its entries
    (full_prefill always runs: it is the reference)."""
    out: list[tuple[str, BlendConfig | None]] = [("full_prefill", None), ("prefix_cache", None),
                                                 ("full_reuse", BlendConfig(ratio=0.0))]
    for mode in ("single", "gradual"):
        for r in ratios:
            out.append((f"blend_{mode}_r{round(r * 100)}", BlendConfig(ratio=r, mode=mode)))
    if only:
        out = [m for m in out if m[0] == "full_prefill" or any(m[0].startswith(o) for o in only)]
    return out


def deviation(res: Prefill, ref_logp: torch.Tensor, ref_keys: list[torch.Tensor]) -> dict:
    """KL(full || mode) of the first token's distribution and the relative key deviation
    from the full prefill at the middle and last layer (measured before decoding)."""
    logp = torch.log_softmax(res.logits, -1)
    out = {"first_token_kl": round(float((ref_logp.exp() * (ref_logp - logp)).sum()), 5)}
    for name, layer in (("key_dev_mid", len(ref_keys) // 2), ("key_dev_last", len(ref_keys) - 1)):
        k = res.cache.layers[layer].keys[:, :, :ref_keys[layer].shape[2]].float()
        out[name] = round(float((k - ref_keys[layer]).norm() / ref_keys[layer].norm()), 5)
    return out


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def run(args: argparse.Namespace, stem: Path) -> dict:
    torch.set_num_threads(args.threads)
    root = datasets_dir() / args.dataset
    questions = read_jsonl(root / "questions.jsonl", args.num)
    corpus = read_jsonl(root / "corpus.jsonl")
    index = {p["id"]: i for i, p in enumerate(corpus)}
    cache_root = Path(args.cache_dir)
    vectors = corpus_embeddings(args.dataset, corpus, cache_root)
    from ragserve.retrieval.embeddings import Embedder

    qvecs = Embedder().encode([q["question"] for q in questions])

    dtype = getattr(torch, args.dtype)
    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    store = KVStore(Path(args.kv_dir), kv_spec(model, model_fingerprint(path, args.model, dtype)),
                    ram_budget_bytes=int(args.ram_mb * 2**20))
    blender = Blender(model, store)
    eos = eos_ids(model, tok)
    mode_list = modes(args.ratios, args.modes)
    prefix_cache = PrefixCache()
    partial = stem.with_suffix(".partial.jsonl")   # one row per finished question: a killed run resumes
    rows: list[dict] = read_jsonl(partial) if partial.is_file() else []
    setup = f"{args.model}/{args.dtype}/{args.chunks}/{args.min_context}/{args.max_new_tokens}"
    qids = {q["id"] for q in questions}
    done = {r["id"] for r in rows if r.get("setup") == setup and r["id"] in qids
            and set(r["modes"]) == {m for m, _ in mode_list}}
    rows = [r for r in rows if r["id"] in done]
    if rows:
        logger.info("resuming: %d questions already measured in %s", len(rows), partial)
    t_start = time.perf_counter()
    for qi, q in enumerate(questions):
        if q["id"] in done:
            continue
        chunks = build_chunks(q, corpus, index, vectors @ qvecs[qi], tok, args.chunks, args.min_context)
        call = answer_call(q["question"], chunks, args.max_new_tokens, stop=("\n",))
        prompt = segment_call(tok, call)
        assert prompt is not None, "the answer prompt did not segment"
        if not prefix_cache.entries:   # steady state of a prefix cache: the system prefix is always there
            head = prompt.token_ids[: prompt.segments[0].end]
            prefix_cache.add(head, hf_prefill(model, head).cache)
        pre = blender.precompute(prompt)
        store.flush()
        store.drop_ram()
        _, load = blender.gather(prompt)               # disk -> RAM, checksums, layout
        row: dict[str, Any] = {
            "id": q["id"], "setup": setup, "question": q["question"], "answers": q["answers"], "num_tokens": len(prompt),
            "num_chunk_tokens": prompt.num_chunk_tokens, "num_fresh_tokens": prompt.num_fresh_tokens,
            "gold_in_context": sum(any(g in c.id.split("+") for c in chunks) for g in q["corpus_ids"]),
            "precompute_s": round(pre.compute_s, 3), "kv_load_s": round(load.load_s, 4),
            "kv_layout_s": round(load.layout_s, 4), "kv_disk_hits": load.num_disk, "modes": {}}
        for name, cfg in mode_list:
            if name == "full_prefill":
                res = hf_prefill(model, prompt.token_ids)
                prefix_cache_add = res.cache
            elif name == "prefix_cache":
                n, past = prefix_cache.lookup(prompt.token_ids)
                res = hf_prefill(model, prompt.token_ids, past, n)
            else:
                assert cfg is not None
                t0 = time.perf_counter()
                again, _ = blender.gather(prompt)     # RAM hits: layout + rotation only
                out = blender.blend(prompt, cfg, again)
                int(out.logits.argmax())
                res = Prefill(out.cache, out.logits, time.perf_counter() - t0,
                              {"recomputed_tokens": out.num_recomputed,
                               "compute_fraction": round(out.compute_fraction, 4),
                               "num_active": out.num_active})
            if name == "full_prefill":   # the reference for the distribution and KV deviations
                ref_logp = torch.log_softmax(res.logits, -1)
                ref_keys = [layer.keys[:, :, :len(prompt)].float() for layer in res.cache.layers]
            res.extra.update(deviation(res, ref_logp, ref_keys))
            answer = greedy(model, tok, res.cache, res.logits, len(prompt), args.max_new_tokens, eos)
            row["modes"][name] = {"ttft_s": round(res.ttft_s, 4), "answer": answer,
                                  "f1": round(best_f1(answer, q["answers"]), 4),
                                  "first_token": int(res.logits.argmax()), **res.extra}
            logger.info("q%d %s ttft %.2fs f1 %.2f %r", qi, name, res.ttft_s, row["modes"][name]["f1"], answer)
        prefix_cache.add(prompt.token_ids, prefix_cache_add)
        full = row["modes"]["full_prefill"]
        for m in row["modes"].values():
            m["agrees_with_full"] = normalize_answer(m["answer"]) == normalize_answer(full["answer"])
            m["first_token_agrees"] = m["first_token"] == full["first_token"]
        rows.append(row)
        with open(partial, "a") as f:
            f.write(json.dumps(row) + "\n")
        logger.info("question %d/%d done (%d tokens) at %.0fs", qi + 1, len(questions), len(prompt),
                    time.perf_counter() - t_start)
    return summarize(args, rows, mode_list, store)


def summarize(args: argparse.Namespace, rows: list[dict], mode_list: list, store: KVStore | None) -> dict:
    full_ttft = [r["modes"]["full_prefill"]["ttft_s"] for r in rows]
    summary: dict[str, dict] = {}
    for name, _ in mode_list:
        ttft = [r["modes"][name]["ttft_s"] for r in rows]
        ratio = [t / f for t, f in zip(ttft, full_ttft)]
        s = {"ttft_median_s": round(statistics.median(ttft), 3), "ttft_p90_s": round(pct(ttft, 0.9), 3),
             "ttft_vs_full_median": round(statistics.median(ratio), 3),
             "f1_mean": round(statistics.mean(r["modes"][name]["f1"] for r in rows), 4),
             "agreement": round(statistics.mean(r["modes"][name]["agrees_with_full"] for r in rows), 3),
             "first_token_agreement": round(statistics.mean(r["modes"][name]["first_token_agrees"] for r in rows), 3)}
        diff = [r["modes"][name]["f1"] - r["modes"]["full_prefill"]["f1"] for r in rows]
        half = 1.96 * statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        s["f1_vs_full"] = round(statistics.mean(diff), 4)       # paired, per question
        s["f1_vs_full_ci95"] = round(half, 4)
        for key in ("compute_fraction", "first_token_kl", "key_dev_last"):
            values = [r["modes"][name].get(key) for r in rows]
            if all(v is not None for v in values):
                s[f"{key}_mean"] = round(statistics.mean(values), 4)
        summary[name] = s
    load = [r["kv_load_s"] for r in rows]
    return {
        "dataset": args.dataset, "model": args.model, "dtype": args.dtype, "num": len(rows),
        "chunks": args.chunks, "min_context": args.min_context, "threads": args.threads,
        "context_tokens_mean": round(statistics.mean(r["num_tokens"] for r in rows), 1),
        "context_tokens_min": min(r["num_tokens"] for r in rows),
        "kv_load_median_ms": round(1000 * statistics.median(load), 2),
        "kv_load_p90_ms": round(1000 * pct(load, 0.9), 2),
        "kv_layout_median_ms": round(1000 * statistics.median(r["kv_layout_s"] for r in rows), 2),
        "kv_store": vars(store.stats) if store is not None else None,
        "command": getattr(args, "command", None) or "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_end": os.getloadavg()},
        "summary": summary, "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"# CacheBlend benchmark: {result['dataset']}, {result['model']} {result['dtype']}", "",
             f"N = {result['num']} questions, {result['chunks']} chunks, prompt tokens mean "
             f"{result['context_tokens_mean']} (min {result['context_tokens_min']}), {result['threads']} threads. "
             f"Chunk KV load from disk: median {result['kv_load_median_ms']} ms, p90 {result['kv_load_p90_ms']} ms "
             f"(+ layout/rotation median {result['kv_layout_median_ms']} ms, counted in blend TTFT).", "",
             f"Command: `{result.get('command', '')}`", "",
             "| mode | TTFT median (s) | TTFT p90 (s) | TTFT / full (median) | compute fraction | F1 | "
             "F1 - full (95% CI) | agrees with full | first token agrees | first-token KL | last-layer key dev |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['ttft_median_s']} | {s['ttft_p90_s']} | {s['ttft_vs_full_median']} | "
                     f"{s.get('compute_fraction_mean', '')} | {s['f1_mean']} | "
                     f"{s.get('f1_vs_full', 0):+.4f} ± {s.get('f1_vs_full_ci95', 0):.4f} | {s['agreement']} | "
                     f"{s['first_token_agreement']} | {s.get('first_token_kl_mean', '')} | "
                     f"{s.get('key_dev_last_mean', '')} |")
    lines += ["", f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs, torch "
              f"{result['machine']['torch']}, load average at the end {result['machine']['loadavg_end']}.", ""]
    return "\n".join(lines)


def combine(paths: list[str], stem: Path) -> dict:
    """One summary over the rows of several result files (e.g. squad + 2wikimultihopqa)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    modes = [set(r["modes"]) for part in parts for r in part["rows"]]
    if any(m != modes[0] for m in modes):
        raise SystemExit(f"--combine: {', '.join(paths)} ran different modes; combine runs of the same modes")
    first = parts[0]
    meta = argparse.Namespace(dataset="+".join(p["dataset"] for p in parts), model=first["model"],
                              dtype=first["dtype"], chunks=first["chunks"], min_context=first["min_context"],
                              threads=first["threads"],
                              command="python eval/bench_blend.py --combine " + " ".join(paths) + f" --out {stem}")
    rows = [r for part in parts for r in part["rows"]]
    result = summarize(meta, rows, [(name, None) for name in first["summary"]], None)
    result["machine"] = first["machine"]   # where the rows were measured, not where they were combined
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--combine", nargs="+", metavar="RESULT_JSON",
                   help="summarize the rows of earlier result files together (no model is run)")
    p.add_argument("--dataset", default="squad", choices=["squad", "2wikimultihopqa"])
    p.add_argument("--num", type=int, default=10)
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--model", default="qwen")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--min-context", type=int, default=1500, help="chunk tokens per prompt, at least")
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.10, 0.15, 0.30])
    p.add_argument("--modes", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="run only modes starting with these, e.g. prefix_cache,full_reuse,blend_single")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--kv-dir", default=str(data_dir() / "kv"), help="disk tier of the chunk KV store")
    p.add_argument("--ram-mb", type=float, default=1024.0)
    p.add_argument("--cache-dir", default=str(cache_dir() / "bench_blend"), help="corpus embeddings")
    p.add_argument("--out", default=None, help="output stem (default eval/results/bench_blend_<dataset>)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stem = Path(args.out) if args.out else RESULTS / f"bench_blend_{args.dataset}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = combine(args.combine, stem) if args.combine else run(args, stem)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    stem.with_suffix(".partial.jsonl").unlink(missing_ok=True)   # its rows are in the JSON now
    print(markdown(result))


if __name__ == "__main__":
    main()
