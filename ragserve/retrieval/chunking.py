"""Documents in, chunks out: loading user input and splitting it by token count.

`load_documents` turns a path (a .txt/.md file, a folder of them, or a .jsonl corpus)
into `Document`s. A `Chunker` splits each document with LangChain's recursive splitter,
measuring length in the SERVING model's tokenizer, so `Chunk.num_tokens` is exactly what
the planner and the KV cache will see. Nothing here embeds or stores anything.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ragserve.domain import Chunk
from ragserve.errors import BadInput

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
CORPUS_SUFFIX = ".jsonl"
_RECORD_FIELDS = ("id", "title", "text")  # the rest of a corpus record becomes metadata
SEPARATORS = ["\n\n", "\n", ". ", " ", ""]  # tried in order by the recursive splitter


@dataclass(frozen=True)
class Document:
    """One source document before chunking."""

    id: str                 # becomes Chunk.doc_id: the resolved file path or the corpus record id
    title: str
    text: str
    # Filterable fields, e.g. qmsum's meeting `doc_id`; copied onto every chunk.
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def load_documents(path: str | Path) -> list[Document]:
    """Read a .txt/.md file, a folder (recursive, sorted) of them, or a .jsonl corpus.

    Documents whose text is only whitespace are dropped. Raises BadInput naming the path
    when it does not exist, is of an unsupported type, is not UTF-8, or holds no documents.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInput(f"input path {str(p)!r} does not exist; give a .txt/.md file, a folder or a .jsonl corpus")
    if p.is_dir():
        docs = [_read_text_file(f) for f in _text_files(p)]
    elif p.suffix.lower() in TEXT_SUFFIXES:
        docs = [_read_text_file(p)]
    elif p.suffix.lower() == CORPUS_SUFFIX:
        docs = _read_corpus(p)
    else:
        raise BadInput(f"unsupported input file {str(p)!r}; give a .txt/.md file, a folder or a .jsonl corpus")
    kept = [d for d in docs if d.text.strip()]
    if len(kept) < len(docs):
        logger.info("skipped %d empty documents in %s", len(docs) - len(kept), p)
    if not kept:
        raise BadInput(f"no documents with text found in {str(p)!r}; "
                       f"expected non-empty {'/'.join(TEXT_SUFFIXES)} files or {CORPUS_SUFFIX} records")
    return kept


def _text_files(root: Path) -> list[Path]:
    # Hidden files and folders (.git, .venv) are never documents.
    return sorted(
        f for f in root.rglob("*")
        if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
    )


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"{where} is not UTF-8 text (bad byte at offset {e.start}); "
                       "convert it to UTF-8 or remove it from the input") from None


def _read_text_file(path: Path) -> Document:
    resolved = path.resolve()
    text = _decode(resolved.read_bytes(), f"file {str(resolved)!r}")
    return Document(id=str(resolved), title=path.stem, text=text)


def _read_corpus(path: Path) -> list[Document]:
    with path.open("rb") as f:
        return corpus_documents(f, str(path), path.stem)


def corpus_documents(lines: Iterable[bytes], name: str, stem: str) -> list[Document]:
    """The documents of a .jsonl corpus given as byte lines; errors name the corpus `name`,
    records without an id get `<stem>:<line>`."""
    docs: list[Document] = []
    seen: dict[str, int] = {}  # record id -> line number, to report duplicates
    for lineno, raw in enumerate(lines, start=1):
        where = f"{name!r} line {lineno}"
        line = _decode(raw, where).strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise BadInput(f"{where} is not valid JSON ({why}); each line must be one "
                           '{"id", "title", "text"} object') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadInput(f"{where} lacks a string 'text' field; each line must be one "
                           '{"id", "title", "text"} object')
        doc_id = str(record.get("id") or f"{stem}:{lineno}")
        if doc_id in seen:
            raise BadInput(f"{where} repeats id {doc_id!r} of line {seen[doc_id]}; ids must be unique")
        seen[doc_id] = lineno
        metadata = {k: v for k, v in record.items() if k not in _RECORD_FIELDS}
        docs.append(Document(id=doc_id, title=str(record.get("title") or ""),
                             text=record["text"], metadata=metadata))
    return docs


class Chunker:
    """Splits documents into chunks of at most `chunk_tokens` tokens of `tokenizer`.

    `tokenizer` is any Hugging Face tokenizer (`PreTrainedTokenizerBase`); counts exclude
    special tokens. LangChain's splitter prefers paragraph, line and word boundaries; a
    piece it leaves over the limit (its sum-of-parts estimate can be off for BPE) is cut
    at token boundaries, so the limit always holds.
    """

    def __init__(self, tokenizer: Any, chunk_tokens: int = 256, chunk_overlap_tokens: int = 32) -> None:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        if chunk_tokens < 1:
            raise BadInput(f"chunk size {chunk_tokens} tokens must be at least 1")
        if not 0 <= chunk_overlap_tokens < chunk_tokens:
            raise BadInput(f"chunk overlap {chunk_overlap_tokens} tokens must be >= 0 and "
                           f"smaller than the chunk size {chunk_tokens}")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap_tokens = chunk_overlap_tokens
        # Sentence ends come before spaces so unbroken prose splits at sentences, not words;
        # "end" keeps each separator on the piece before it, so chunks read naturally.
        self._splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            tokenizer, chunk_size=chunk_tokens, chunk_overlap=chunk_overlap_tokens,
            separators=SEPARATORS, keep_separator="end")
        # The splitter measures each piece two or three times (split, merge, overlap);
        # memoizing its tokenizer length function halves the tokenizer calls.
        if callable(getattr(self._splitter, "_length_function", None)):
            self._splitter._length_function = functools.lru_cache(maxsize=1 << 16)(
                self._splitter._length_function)

    @property
    def tokenizer_id(self) -> str:
        """Names the tokenizer in a collection manifest: token counts are only valid for it."""
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__)

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        # verbose=False: counting a text longer than the tokenizer's own model limit is fine here.
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def split(self, doc_id: str, title: str, text: str,
              metadata: dict[str, Any] | None = None) -> list[Chunk]:
        """Chunks of one document, ids "<doc_id>#<n>" in document order."""
        # A document that fits is one chunk: the splitter would only re-join its words
        # (measuring each one with the tokenizer, slow for thousands of short passages).
        stripped = text.strip()
        fits = stripped and self.count_tokens([stripped])[0] <= self.chunk_tokens
        pieces = [stripped] if fits else [p for p in self._splitter.split_text(text) if p.strip()]
        texts: list[str] = []
        counts: list[int] = []
        for piece, n in zip(pieces, self.count_tokens(pieces)):
            if n <= self.chunk_tokens:
                texts.append(piece)
                counts.append(n)
            else:
                cut = self._cut_by_tokens(piece)
                texts.extend(cut)
                counts.extend(self.count_tokens(cut))
        return [Chunk(id=f"{doc_id}#{i}", doc_id=doc_id, text=t, num_tokens=n, title=title,
                      metadata=dict(metadata or {}))
                for i, (t, n) in enumerate(zip(texts, counts))]

    def split_documents(self, docs: Iterable[Document]) -> list[Chunk]:
        return [c for d in docs for c in self.split(d.id, d.title, d.text, d.metadata)]

    def _cut_by_tokens(self, text: str) -> list[str]:
        # Cut at token offsets; re-tokenizing a cut can merge tokens differently, so
        # shrink the window until every piece fits.
        window = self.chunk_tokens
        while True:
            pieces = [p for p in self._token_windows(text, window) if p.strip()]
            if all(n <= self.chunk_tokens for n in self.count_tokens(pieces)) or window == 1:
                logger.debug("cut an over-long piece into %d windows of %d tokens", len(pieces), window)
                return pieces
            window = max(1, window - max(1, window // 10))

    def _token_windows(self, text: str, window: int) -> list[str]:
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, verbose=False,
                                     return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError, KeyError):  # slow tokenizers have no offsets
            return [self.tokenizer.decode(ids[i:i + window]) for i in range(0, len(ids), window)]
        starts = [offsets[i][0] for i in range(0, len(offsets), window)]
        ends = starts[1:] + [len(text)]
        return [text[s:e] for s, e in zip(starts, ends)]
