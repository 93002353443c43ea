"""The four evaluation datasets: questions, corpus, collections, filters and scoring.

Data flow: `load_questions(name)` reads `<datasets dir>/<name>/questions.jsonl` (schema in
shared/datasets/README.md); `ensure_collection` ingests that dataset's `corpus.jsonl` into
its own collection once (`eval-<dataset>-<model>`: chunks are counted in the serving
model's tokens, so each model has its own); `query_filters` restricts a question's
retrieval where the dataset needs it; `score` turns an answer into every metric and the
dataset's primary `quality`.

Filters (decided per dataset):
  - qmsum: always `{"doc_id": <meeting>}`. Its queries ("Summarize the meeting") only
    make sense inside their own meeting (datasets README).
  - financebench: none by default: one shared store over all 69 filings, where other
    years of the same company are the intended hard distractors (FinanceBench's "shared
    vector store" setting; METIS' KG RAG FinSec also retrieves over all reports). The
    questions name company and year, so retrieval can find the filing. `doc_filter=True`
    restricts each question to its filing (FinanceBench's "single vector store" setting).
  - squad, 2wikimultihopqa: none (one corpus, distractors included).

Corpus subsets (`corpus_limit`, smoke runs only): the gold passages of the sampled
questions plus the first `corpus_limit` other passages of the corpus (for qmsum and
financebench: other passages of the same meetings/filings first, so filtered retrieval
still has distractors). The subset collection's name carries a hash of its passage ids
(`eval-<dataset>-<model>-s<hash>`), so a subset never mixes into the full collection.
Numbers from a subset are not comparable with full-corpus runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ragserve.config import Config, SynthesisConfig, datasets_dir
from ragserve.errors import BadInput, NotFound
from ragserve.metrics import best_em, best_f1, best_numeric_match, best_rouge_l

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """What the evaluation needs to know about one dataset."""

    name: str
    quality_metric: str          # the primary metric: f1 | rouge_l | numeric_or_f1
    description: str             # METIS' one-line dataset metadata for the profiler
    answer_tokens: int           # cap on the final answer (gold answers' length + slack)
    answer_style: str            # synthesis.answer_style: short (a phrase) | summary (sentences, no newline stop)
    filter_key: str | None       # question field that restricts retrieval ("doc_id"), if any
    filter_always: bool          # apply filter_key by default (qmsum) or only on request


DATASETS: dict[str, DatasetSpec] = {
    "squad": DatasetSpec(
        "squad", "f1", "Wikipedia paragraphs (SQuAD v1.1 dev, 48 articles); single-hop factual questions",
        answer_tokens=32, answer_style="short", filter_key=None, filter_always=False),
    "2wikimultihopqa": DatasetSpec(
        "2wikimultihopqa", "f1",
        "Wikipedia paragraphs about people, films and places; multi-hop questions (2-4 paragraphs)",
        answer_tokens=32, answer_style="short", filter_key=None, filter_always=False),
    "qmsum": DatasetSpec(
        "qmsum", "rouge_l",
        "Meeting transcripts (product design, academic, parliament), one meeting per query; "
        "query-focused summaries",
        answer_tokens=160, answer_style="summary", filter_key="doc_id", filter_always=True),
    "financebench": DatasetSpec(
        "financebench", "numeric_or_f1",
        "Pages of SEC filings (10-K, 10-Q, 8-K) of public companies, 2015-2023; financial questions",
        answer_tokens=96, answer_style="short", filter_key="doc_id", filter_always=False),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise BadInput(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


def dataset_dir(name: str, root: str | Path | None = None) -> Path:
    get_spec(name)
    path = Path(root) if root else datasets_dir()
    folder = path / name
    if not (folder / "questions.jsonl").is_file() or not (folder / "corpus.jsonl").is_file():
        raise NotFound(f"dataset {name!r} not found under {str(path)!r} (need {name}/questions.jsonl and "
                       f"{name}/corpus.jsonl); pass --datasets-dir or set RAGSERVE_DATASETS")
    return folder


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_questions(name: str, root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every question of the dataset, in file order."""
    return _read_jsonl(dataset_dir(name, root) / "questions.jsonl")


def load_corpus(name: str, root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every passage record of the dataset, in file order."""
    return _read_jsonl(dataset_dir(name, root) / "corpus.jsonl")


# ---------------------------------------------------------------------------- settings

def apply_dataset_settings(config: Config, spec: DatasetSpec, collection: str) -> Config:
    """The dataset's answer length/stop/style and profiler description, where `config` leaves
    the defaults (an explicit config file wins)."""
    default = SynthesisConfig()
    syn = config.synthesis
    if syn.answer_tokens == default.answer_tokens:
        syn = replace(syn, answer_tokens=spec.answer_tokens)
    if syn.answer_style == default.answer_style:
        syn = replace(syn, answer_style=spec.answer_style)
    if spec.answer_style == "summary" and syn.answer_stop == default.answer_stop:
        syn = replace(syn, answer_stop=())
    descriptions = dict(config.metis.descriptions)
    descriptions.setdefault(collection, spec.description)
    return replace(config, synthesis=syn, metis=replace(config.metis, descriptions=descriptions))


def query_filters(spec: DatasetSpec, question: dict[str, Any], doc_filter: bool = False
                  ) -> dict[str, Any] | None:
    """Retrieval filters of one question (see the module docstring)."""
    if spec.filter_key and (spec.filter_always or doc_filter) and question.get(spec.filter_key):
        return {spec.filter_key: question[spec.filter_key]}
    return None


# ---------------------------------------------------------------------------- scoring

def score(spec: DatasetSpec, answer: str, golds: Sequence[str]) -> dict[str, float | None]:
    """Every metric of one answer, plus `quality`: the dataset's primary metric
    (financebench: the numeric match when the gold holds a number, else F1)."""
    out: dict[str, float | None] = {
        "f1": best_f1(answer, golds), "em": best_em(answer, golds),
        "rouge_l": best_rouge_l(answer, golds), "numeric": best_numeric_match(answer, golds)}
    if spec.quality_metric == "rouge_l":
        out["quality"] = out["rouge_l"]
    elif spec.quality_metric == "numeric_or_f1":
        out["quality"] = out["numeric"] if out["numeric"] is not None else out["f1"]
    else:
        out["quality"] = out["f1"]
    return out


# ---------------------------------------------------------------------------- collections

def subset_passages(corpus: Sequence[dict[str, Any]], questions: Sequence[dict[str, Any]],
                    corpus_limit: int) -> list[dict[str, Any]]:
    """Gold passages of `questions` + up to `corpus_limit` others (module docstring)."""
    if corpus_limit < 0:
        raise BadInput(f"corpus_limit={corpus_limit} must be >= 0")
    gold = {cid for q in questions for cid in q.get("corpus_ids", ())}
    groups = {q["doc_id"] for q in questions if q.get("doc_id")}
    same_group = [p for p in corpus if p["id"] not in gold and p.get("doc_id") in groups]
    others = [p for p in corpus if p["id"] not in gold and p.get("doc_id") not in groups]
    extra = {p["id"] for p in (same_group + others)[:corpus_limit]}
    return [p for p in corpus if p["id"] in gold or p["id"] in extra]


def collection_name(dataset: str, model: str, passage_ids: Sequence[str] | None = None) -> str:
    """`eval-<dataset>-<model>`, or `...-s<hash>` for a corpus subset."""
    name = f"eval-{dataset}-{model}"
    if passage_ids is not None:
        digest = hashlib.sha256("\n".join(sorted(passage_ids)).encode()).hexdigest()[:10]
        name += f"-s{digest}"
    return name


@dataclass(frozen=True)
class CorpusInfo:
    collection: str
    num_passages: int       # passages of the (sub)corpus
    num_ingested: int       # passages ingested by this call (0 when the collection was complete)
    num_chunks: int         # chunks in the collection
    subset: bool


def ensure_collection(dataset: str, config: Config, questions: Sequence[dict[str, Any]],
                      corpus_limit: int | None = None, root: str | Path | None = None,
                      tokenizer: Any = None, embedder: Any = None, progress: bool = True) -> CorpusInfo:
    """Ingest the dataset's corpus (or subset) into its collection, once: passages already
    stored (by document id) are skipped, so a rerun costs a collection open."""
    from ragserve.retrieval.chunking import Document
    from ragserve.retrieval.ingest import ingest_documents
    from ragserve.retrieval.base import open_store

    corpus = load_corpus(dataset, root)
    passages = corpus if corpus_limit is None else subset_passages(corpus, questions, corpus_limit)
    model = config.engine.model
    name = collection_name(dataset, model, None if corpus_limit is None else [p["id"] for p in passages])
    stored: set[str] = set()
    store = open_store(config.retrieval)
    if name in store.list_collections():
        stored = {doc_id for doc_id, _ in store.open(name).chunk_hashes().values()}
    missing = [p for p in passages if p["id"] not in stored]
    if missing:
        if tokenizer is None:
            from ragserve.engines.local.models import load_tokenizer
            tokenizer = load_tokenizer(model)
        if embedder is None:
            from ragserve.retrieval.embeddings import Embedder
            embedder = Embedder()
        docs = [Document(id=p["id"], title=str(p.get("title") or ""), text=p["text"],
                         metadata={k: v for k, v in p.items() if k not in ("id", "title", "text")})
                for p in missing]
        logger.info("ingesting %d of %d %s passages into %s", len(docs), len(passages), dataset, name)
        ingest_documents(docs, name, tokenizer, embedder, config.retrieval, progress=progress,
                         source=f"{dataset} corpus", store=store)
    return CorpusInfo(collection=name, num_passages=len(passages), num_ingested=len(missing),
                      num_chunks=len(store.open(name)), subset=corpus_limit is not None)
