"""CacheBlend benchmark: the quality–TTFT curve of blended prefill against full prefill.

    # cheap signals (prefill only), for iterating on token selection:
    python eval/bench_blend.py --datasets squad,2wikimultihopqa,qmsum --num 20 --cheap \
        --variants single,sink4,edge4,mass80,layer2
    # the confirming run (greedy decode, paired F1 / ROUGE-L), resumable:
    python eval/bench_blend.py --datasets squad,2wikimultihopqa,qmsum --num 100 --variants single

Per question: the stuff prompt (`prompts.ANSWER`, via `synthesis.answer_call`) over `--chunks`
chunks of >= `--min-context` tokens in total, built from the question's gold passages plus the
corpus passages closest to the question (all-MiniLM-L6-v2 cosine, `ragserve.retrieval.embeddings`);
passages are packed in rank order into chunks of about min_context/chunks tokens, golds that
rank lower are inserted at a seeded position (qmsum: a question with more golds than chunks
draws from its own meeting; transcript passages are cut to 256 tokens). Every mode prefills
the *same* token ids (`segments.segment_call`, equal to the chat template's). Questions of
the datasets are interleaved, so a partial run covers each about equally.

Modes: full_prefill (HF forward, the reference), prefix_cache (full runs only: vLLM-style
automatic prefix caching over 16-token blocks), then `<variant>_r<N>` for every variant and
ratio: the blend recomputing N% of the reused tokens with the variant's token selection
(`variant_config`: single, gradual, value, sink<N>, edge<N>, mass<P>, layer<L>, '+'-joined).

Per (mode, ratio), paired per question against full prefill: mean quality difference (F1 for
squad/2wikimultihopqa, ROUGE-L for qmsum) with its 95% CI, answer agreement (normalized
answers equal), first-token agreement, first-token KL(full || mode), TTFT ratio (median of
per-question blend TTFT / full TTFT; chunk KV in RAM, layout and key rotation included).
`--cheap` skips decoding: only the first-token signals and TTFT.

Writes <out>.json ("rows": one per mode and ratio; "by_dataset"; "questions": per-question
records), <out>.md and <out>.png (default out: eval/results/bench_blend_curve). After every
question the files are rewritten and the question is appended to <out>.partial.jsonl: a killed
run resumes there and its files say "partial: n of N". `--combine A.json B.json --out STEM`
makes one curve over several finished runs' questions.
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
from ragserve.metrics import best_f1, best_rouge_l, normalize_answer  # noqa: E402
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
                 num_chunks: int, min_context: int, max_passage_tokens: int | None = None) -> list[Chunk]:
    """Gold passages + nearest passages, packed in rank order into `num_chunks` chunks.

    A question with more gold passages than chunks (qmsum's whole-meeting queries) draws from
    its golds only, nearest first. `max_passage_tokens` cuts longer passages (qmsum transcript
    chunks run ~400 tokens; uncut, six of them cost a long prefill per mode)."""
    rng = random.Random(q["id"])
    gold = [index[c] for c in q["corpus_ids"] if c in index]
    if len(gold) > num_chunks:
        order = sorted(gold, key=lambda g: -scores[g])
        gold = []
    else:
        ranked = [int(i) for i in np.argsort(-scores) if int(i) not in gold]
        order = ranked[: num_chunks * 8]
    for g in gold:   # a gold passage keeps its rank if it is near the top, else lands at random
        rank = int((scores > scores[g]).sum())
        order.insert(rank if rank < len(order) else rng.randrange(len(order) + 1), g)

    def passage(i: int) -> str:
        text = corpus[i]["text"]
        if max_passage_tokens:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_passage_tokens:
                text = tok.decode(ids[:max_passage_tokens])
        return f"{corpus[i]['title']}\n{text}"

    target = -(-min_context // num_chunks)
    chunks: list[Chunk] = []
    ids: list[str] = []
    texts: list[str] = []
    size = total = 0
    for i in order:
        p = corpus[i]
        texts.append(passage(i))
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
    if texts and len(chunks) < num_chunks:   # ran out of candidates: the rest is the last chunk
        chunks.append(Chunk(id="+".join(ids), doc_id=ids[0], text="\n\n".join(texts), num_tokens=size))
    missing = [g for g in gold if not any(corpus[g]["id"] in c.id.split("+") for c in chunks)]
    if missing:   # a gold passage fell past the last chunk: swap it into a random chunk's place
        for g in missing:
            j = rng.randrange(len(chunks))
            p = corpus[g]
            text = passage(g)
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
QUALITY = {"squad": "f1", "2wikimultihopqa": "f1", "qmsum": "rouge_l"}   # the paired quality metric
MAX_NEW = {"qmsum": 64}   # summaries run longer than a short answer
PASSAGE_CAP = {"qmsum": 256}
ALIASES = {"single": {}, "gradual": {"mode": "gradual"}, "value": {"deviation": "value"}}


def variant_config(spec: str, ratio: float) -> BlendConfig:
    """A BlendConfig from a variant name: '+'-joined parts, each `single`, `gradual`, `value`,
    `sink<N>` (each chunk's first N tokens), `edge<N>` (first and last N), `mass<P>`
    (per-prompt ratio covering P% of the deviation, capped by the ratio), `layer<L>`
    (check layer L; with gradual: layers L..L+3)."""
    kw: dict[str, Any] = {"ratio": ratio, "sink_tokens": 0}   # single: LMCache's plain top-r
    for part in spec.split("+"):
        head = part.rstrip("0123456789")
        num = part[len(head):]
        if part in ALIASES:
            kw.update(ALIASES[part])
        elif head == "sink" and num:
            kw["sink_tokens"] = int(num)
        elif head == "edge" and num:
            kw["sink_tokens"] = kw["boundary_tokens"] = int(num)
        elif head == "mass" and num:
            kw["deviation_mass"] = int(num) / 100
        elif head == "layer" and num:
            kw["check_layers"] = (int(num),)
        else:
            raise SystemExit(f"--variants: unknown part {part!r} in {spec!r}; use single, gradual, value, "
                             "sink<N>, edge<N>, mass<P>, layer<L>, joined with '+'")
    if kw.get("mode") == "gradual" and "check_layers" in kw:
        first = kw["check_layers"][0]
        kw["check_layers"] = tuple(range(first, first + 4))
    return BlendConfig(**kw)


def modes(ratios: list[float], variants: list[str], cheap: bool,
          prefix_cache: bool = True) -> list[tuple[str, str, float, BlendConfig | None]]:
    """(mode name, variant, ratio, config): full_prefill first (the reference), prefix_cache
    unless cheap or turned off, then every variant at every ratio."""
    out: list[tuple[str, str, float, BlendConfig | None]] = [("full_prefill", "full_prefill", 1.0, None)]
    if not cheap and prefix_cache:
        out.append(("prefix_cache", "prefix_cache", 1.0, None))
    for spec in variants:
        v, _, own = spec.partition("@")   # "sink4@0.15/0.3": this variant at its own ratios
        for r in ([float(x) for x in own.split("/")] if own else ratios):
            out.append((f"{v}_r{round(r * 100)}", v, r, variant_config(v, r)))
    return out


def first_token_kl(logits: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """KL(full || mode) of the first output token's distribution."""
    logp = torch.log_softmax(logits, -1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum())


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% CI (0 for fewer than 2 values)."""
    if not values:
        return float("nan"), float("nan")
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.mean(values), half


def interleave(per_dataset: list[list[dict]]) -> list[dict]:
    """Round-robin over datasets, so a partial run covers each about equally."""
    out = []
    for i in range(max((len(x) for x in per_dataset), default=0)):
        out += [x[i] for x in per_dataset if i < len(x)]
    return out


class Dataset:
    """One dataset's corpus, embeddings and questions (with their query vectors)."""

    def __init__(self, name: str, num: int, cache: Path) -> None:
        from ragserve.retrieval.embeddings import Embedder

        root = datasets_dir() / name
        self.name = name
        self.questions = [dict(q, dataset=name) for q in read_jsonl(root / "questions.jsonl", num)]
        self.corpus = read_jsonl(root / "corpus.jsonl")
        self.index = {p["id"]: i for i, p in enumerate(self.corpus)}
        self.vectors = corpus_embeddings(name, self.corpus, cache)
        qvecs = Embedder().encode([q["question"] for q in self.questions])
        for q, v in zip(self.questions, qvecs):
            q["_vec"] = v


def run(args: argparse.Namespace, stem: Path) -> dict:
    torch.set_num_threads(args.threads)
    data = {d: Dataset(d, args.num, Path(args.cache_dir)) for d in args.datasets}
    questions = interleave([d.questions for d in data.values()])

    dtype = getattr(torch, args.dtype)
    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    store = KVStore(Path(args.kv_dir), kv_spec(model, model_fingerprint(path, args.model, dtype)),
                    ram_budget_bytes=int(args.ram_mb * 2**20))
    blender = Blender(model, store)
    eos = eos_ids(model, tok)
    mode_list = modes(args.ratios, args.variants, args.cheap, args.prefix_cache)
    prefix_cache = PrefixCache()
    partial = stem.with_suffix(".partial.jsonl")   # one line per finished question: a killed run resumes
    rows: list[dict] = read_jsonl(partial) if partial.is_file() else []
    setup = f"{args.model}/{args.dtype}/{args.chunks}/{args.min_context}/{args.max_new_tokens}/{'cheap' if args.cheap else 'full'}"
    keys = {(q["dataset"], q["id"]) for q in questions}
    names = {m[0] for m in mode_list}
    rows = [r for r in rows if r.get("setup") == setup and (r["dataset"], r["id"]) in keys
            and set(r["modes"]) >= names]
    done = {(r["dataset"], r["id"]) for r in rows}
    if rows:
        logger.info("resuming: %d questions already measured in %s", len(rows), partial)
    t_start = time.perf_counter()
    for qi, q in enumerate(questions):
        if (q["dataset"], q["id"]) in done:
            continue
        d = data[q["dataset"]]
        max_new = MAX_NEW.get(d.name, args.max_new_tokens)
        chunks = build_chunks(q, d.corpus, d.index, d.vectors @ q["_vec"], tok, args.chunks, args.min_context,
                              PASSAGE_CAP.get(d.name))
        call = answer_call(q["question"], chunks, max_new, stop=("\n",))
        prompt = segment_call(tok, call)
        assert prompt is not None, "the answer prompt did not segment"
        if args.prefix_cache and not args.cheap and not prefix_cache.entries:   # a prefix cache's steady state holds the system prefix
            head_ids = prompt.token_ids[: prompt.segments[0].end]
            prefix_cache.add(head_ids, hf_prefill(model, head_ids).cache)
        pre = blender.precompute(prompt)
        store.flush()
        store.drop_ram()
        _, load = blender.gather(prompt)               # disk -> RAM, checksums, layout
        metric = QUALITY[d.name]
        score = best_rouge_l if metric == "rouge_l" else best_f1
        row: dict[str, Any] = {
            "dataset": d.name, "id": q["id"], "setup": setup, "question": q["question"],
            "num_tokens": len(prompt), "num_reused_tokens": prompt.num_reused_tokens,
            "num_fresh_tokens": prompt.num_fresh_tokens, "metric": metric,
            "gold_in_context": sum(any(g in c.id.split("+") for c in chunks) for g in q["corpus_ids"]),
            "precompute_s": round(pre.compute_s, 3), "kv_load_s": round(load.load_s, 4),
            "kv_layout_s": round(load.layout_s, 4), "modes": {}}
        for name, _variant, _ratio, cfg in mode_list:
            if name == "full_prefill":
                res = hf_prefill(model, prompt.token_ids)
                full_cache = res.cache
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
                              {"compute_fraction": round(out.compute_fraction, 4),
                               # share of the reused tokens recomputed past the last check layer
                               "recompute_share": round((out.num_recomputed - prompt.num_fresh_tokens)
                                                        / max(1, prompt.num_reused_tokens), 4)})
            if name == "full_prefill":
                ref_logp = torch.log_softmax(res.logits, -1)
            m = {"ttft_s": round(res.ttft_s, 4), "first_token": int(res.logits.argmax()),
                 "kl": round(first_token_kl(res.logits, ref_logp), 5), **res.extra}
            if not args.cheap:
                m["answer"] = greedy(model, tok, res.cache, res.logits, len(prompt), max_new, eos)
                m["quality"] = round(score(m["answer"], q["answers"]), 4)
            row["modes"][name] = m
            logger.info("q%d %s %s ttft %.2fs kl %.3f %s", qi, d.name, name, res.ttft_s, m["kl"],
                        repr(m.get("answer", "")))
        if args.prefix_cache and not args.cheap:
            prefix_cache.add(prompt.token_ids, full_cache)
        full = row["modes"]["full_prefill"]
        for m in row["modes"].values():
            m["first_token_agrees"] = m["first_token"] == full["first_token"]
            if not args.cheap:
                m["agrees"] = normalize_answer(m["answer"]) == normalize_answer(full["answer"])
        rows.append(row)
        with open(partial, "a") as f:
            f.write(json.dumps(row) + "\n")
        write(dict(summarize(args, rows, mode_list), planned=len(questions)), stem)   # a killed run leaves honest files
        logger.info("question %d/%d done (%s, %d tokens) at %.0fs", qi + 1, len(questions), d.name, len(prompt),
                    time.perf_counter() - t_start)
    return dict(summarize(args, rows, mode_list), planned=len(questions))


def curve_row(rows: list[dict], name: str, variant: str, ratio: float) -> dict:
    """One (mode, ratio) point over `rows`, paired against full_prefill per question."""
    ms = [r["modes"][name] for r in rows]
    full = [r["modes"]["full_prefill"] for r in rows]
    ttft = [m["ttft_s"] / f["ttft_s"] for m, f in zip(ms, full)]
    kl, kl_ci = mean_ci([m["kl"] for m in ms])
    out: dict[str, Any] = {"mode": variant, "ratio": ratio, "n": len(rows),
                           "ttft_ratio": round(statistics.median(ttft), 3),
                           "f1_diff": None, "f1_diff_ci95": None, "agreement": None,
                           "first_token_agreement": round(statistics.mean(m["first_token_agrees"] for m in ms), 3),
                           "kl": round(kl, 4), "kl_ci95": round(kl_ci, 4)}
    if all("quality" in m for m in ms):
        diff, half = mean_ci([m["quality"] - f["quality"] for m, f in zip(ms, full)])
        out.update(f1_diff=round(diff, 4), f1_diff_ci95=round(half, 4),
                   agreement=round(statistics.mean(m["agrees"] for m in ms), 3),
                   quality=round(statistics.mean(m["quality"] for m in ms), 4))
    for key in ("compute_fraction", "recompute_share"):
        if all(key in m for m in ms):
            out[key] = round(statistics.mean(m[key] for m in ms), 4)
    return out


def summarize(args: argparse.Namespace, rows: list[dict], mode_list: list) -> dict:
    """The curve over all rows ("rows": one per mode and ratio) and per dataset."""
    curve = [curve_row(rows, name, variant, ratio) for name, variant, ratio, _ in mode_list if rows]
    by_dataset = {}
    for d in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == d]
        by_dataset[d] = [curve_row(sub, name, variant, ratio) for name, variant, ratio, _ in mode_list]
    return {
        "datasets": sorted({r["dataset"] for r in rows}), "model": args.model, "dtype": args.dtype,
        "num": len(rows), "num_per_dataset": {d: v[0]["n"] for d, v in by_dataset.items()},
        "cheap": args.cheap, "chunks": args.chunks, "min_context": args.min_context, "threads": args.threads,
        "quality_metric": {d: QUALITY[d] for d in by_dataset},
        "context_tokens_mean": round(statistics.mean(r["num_tokens"] for r in rows), 1) if rows else None,
        "kv_load_median_ms": round(1000 * statistics.median(r["kv_load_s"] for r in rows), 2) if rows else None,
        "command": getattr(args, "command", None) or "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_end": os.getloadavg()},
        "rows": curve, "by_dataset": by_dataset, "questions": rows,
    }


def fmt(value: Any, ci: Any = None) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f} ± {ci:.4f}" if ci is not None else f"{value}"


def markdown(result: dict) -> str:
    metric = ", ".join(f"{d}: {m}" for d, m in result["quality_metric"].items())
    planned = result.get("planned")
    status = f" — **partial: {result['num']} of {planned} questions**" if planned and result["num"] < planned else ""
    lines = [f"# CacheBlend quality–TTFT curve: {'+'.join(result['datasets'])}, {result['model']} {result['dtype']}"
             f"{status}", "",
             f"N = {result['num']} paired questions ({', '.join(f'{d} {n}' for d, n in result['num_per_dataset'].items())}), "
             f"{result['chunks']} chunks, prompt tokens mean {result['context_tokens_mean']}, "
             f"{'cheap signals only (prefill, no decode)' if result['cheap'] else 'greedy decode'}; quality metric {metric}. "
             "Every difference is paired per question against full prefill (mean ± 95% CI half-width). "
             "TTFT ratio: median over questions of blend TTFT / full-prefill TTFT (chunk KV in RAM; includes "
             "layout and key rotation; shared CPU, so noisy).", "",
             f"Command: `{result.get('command', '')}`", "",
             "| mode | ratio | n | TTFT ratio | recomputed share | quality diff (95% CI) | answer agreement | "
             "first-token agreement | first-token KL (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['ratio']} | {r['n']} | {r['ttft_ratio']} | {r.get('recompute_share', '–')} | "
                     f"{fmt(r['f1_diff'], r['f1_diff_ci95'])} | {fmt(r['agreement'])} | {r['first_token_agreement']} | "
                     f"{r['kl']} ± {r['kl_ci95']} |")
    for d, curve in result["by_dataset"].items():
        if len(result["by_dataset"]) < 2:
            break
        lines += ["", f"## {d} ({result['quality_metric'][d]}, n = {curve[0]['n']})", "",
                  "| mode | ratio | TTFT ratio | quality diff (95% CI) | agreement | first-token agreement | KL |",
                  "|---|---|---|---|---|---|---|"]
        for r in curve:
            lines.append(f"| {r['mode']} | {r['ratio']} | {r['ttft_ratio']} | {fmt(r['f1_diff'], r['f1_diff_ci95'])} | "
                         f"{fmt(r['agreement'])} | {r['first_token_agreement']} | {r['kl']} |")
    lines += ["", f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs, torch "
              f"{result['machine']['torch']}, load average at the end {result['machine']['loadavg_end']}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Quality (or first-token KL when cheap) against TTFT ratio, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cheap = any(r["f1_diff"] is None for r in result["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["mode"] for r in result["rows"] if r["mode"] != "full_prefill"):
        pts = [r for r in result["rows"] if r["mode"] == mode]
        x = [r["ttft_ratio"] for r in pts]
        if cheap:
            axes[0].errorbar(x, [r["kl"] for r in pts], yerr=[r["kl_ci95"] for r in pts], marker="o", label=mode, capsize=2)
        else:
            axes[0].errorbar(x, [r["f1_diff"] for r in pts], yerr=[r["f1_diff_ci95"] for r in pts], marker="o",
                             label=mode, capsize=2)
        axes[1].plot(x, [r["first_token_agreement"] if cheap else r["agreement"] for r in pts], marker="o", label=mode)
    axes[0].set_ylabel("first-token KL vs full prefill" if cheap else "quality − full prefill (paired, 95% CI)")
    axes[1].set_ylabel("first-token agreement" if cheap else "answer agreement with full prefill")
    if not cheap:
        axes[0].axhline(-0.02, color="grey", ls="--", lw=1)
        axes[1].axhline(0.8, color="grey", ls="--", lw=1)
    for ax in axes:
        ax.set_xlabel("TTFT / full prefill (median)")
        ax.axvline(0.33, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CacheBlend, {result['model']}, N = {result['num']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))


def combine(paths: list[str], stem: Path) -> dict:
    """One curve over the questions of several result files (e.g. separate runs per dataset)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    # the modes every question ran (a later run may carry only the default variant)
    common = set.intersection(*(set(q["modes"]) for part in parts for q in part["questions"]))
    if not common - {"full_prefill"}:
        raise SystemExit(f"--combine: {', '.join(paths)} share no blend mode; combine runs of the same modes")
    mode_list = [(m, r["mode"], r["ratio"], None) for m, r in zip(first["questions"][0]["modes"], first["rows"])
                 if m in common]
    dropped = sorted({m for part in parts for q in part["questions"] for m in q["modes"]} - common)
    if dropped:
        logging.getLogger("bench_blend").warning("--combine: left out %s (not run on every question)", dropped)
    meta = argparse.Namespace(model=first["model"], dtype=first["dtype"], chunks=first["chunks"], cheap=first["cheap"],
                              min_context=first["min_context"], threads=first["threads"],
                              command="python eval/bench_blend.py --combine " + " ".join(paths) + f" --out {stem}")
    result = summarize(meta, [q for part in parts for q in part["questions"]], mode_list)
    result["machine"] = first["machine"]   # where the rows were measured, not where they were combined
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--combine", nargs="+", metavar="RESULT_JSON",
                   help="one curve over the questions of earlier result files (no model is run)")
    p.add_argument("--datasets", type=lambda s: [x for x in s.split(",") if x], default=["squad"],
                   help=f"comma-separated, of {', '.join(QUALITY)}; questions are interleaved")
    p.add_argument("--num", type=int, default=10, help="questions per dataset (the first N)")
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--model", default="qwen")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    p.add_argument("--min-context", type=int, default=1500, help="chunk tokens per prompt, at least")
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.0, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50])
    p.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x], default=["single"],
                   help="token-selection variants, e.g. single,sink4,edge4,mass80,layer2,sink4+layer2,gradual; "
                        "VARIANT@R1/R2 runs that one at its own ratios (e.g. layer2@0.15/0.3)")
    p.add_argument("--cheap", action="store_true",
                   help="prefill only: first-token KL and agreement, no decode (for iterating)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="skip the prefix_cache mode (a second full prefill per question)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--kv-dir", default=str(data_dir() / "kv"), help="disk tier of the chunk KV store")
    p.add_argument("--ram-mb", type=float, default=1024.0)
    p.add_argument("--cache-dir", default=str(cache_dir() / "bench_blend"), help="corpus embeddings")
    p.add_argument("--out", default=None, help="output stem (default eval/results/bench_blend_curve)")
    args = p.parse_args()
    for d in args.datasets:
        if d not in QUALITY:
            raise SystemExit(f"--datasets: {d!r} is not one of {', '.join(QUALITY)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stem = Path(args.out) if args.out else RESULTS / "bench_blend_curve"
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = combine(args.combine, stem) if args.combine else run(args, stem)
    write(result, stem)
    plot(result, stem.with_suffix(".png"))
    stem.with_suffix(".partial.jsonl").unlink(missing_ok=True)   # its rows are in the JSON now
    print(markdown(result))


if __name__ == "__main__":
    main()
