"""Prompt segmentation for chunk-KV reuse: which tokens of a prompt may come from stored KV.

A blendable prompt is tokenized in pieces whose token ids are concatenated:

    [prefix][chunk 1][glue][chunk 2][glue] ... [chunk n][suffix]
     prefix  chat-template head + system prompt + "Context:\\n[1]"
     chunk   " title\\ntext\\n\\n": one passage after its "[i]" marker, with the separator
     glue    "[i]": the marker, which changes with the chunk's position
     suffix  "Question: ...\\nAnswer:" + template tail

Prefix and chunks are *reused* (their KV comes from the store); glue and suffix are always
computed. The prefix is a true prefix, so its stored KV (computed alone at position 0) is
exact. A chunk's KV is computed after a fixed *context* and stored independent of where the
chunk lands (keys pre-RoPE). The context is the prompt's prefix by default ("prefix": the
answer template's system prompt + "Context:\\n[1]", so a chunk in first place is exact and
every chunk has seen the instructions and an attention sink); "first_token" uses only the
prompt's first token, like CacheBlend's prototype prefilling each chunk after BOS. On Qwen2.5
0.5B the prefix context halves the first-token KL to a full prefill (r = 0 and 15%, 6 SQuAD
prompts). Either way the context is part of the store key.

The prompt is tokenized as one text, so its ids equal a normal prefill's; segments are cut
at token boundaries (a token merged across a cut is recomputed). A chunk's ids are thus
those it has inside a prompt; with the cut points below they do not depend on the chunk's
position, so a one-chunk prompt yields the ids to precompute at ingest.
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ragserve import prompts
from ragserve.domain import LLMCall

PREFIX, CHUNK, GLUE, SUFFIX = "prefix", "chunk", "glue", "suffix"
REUSED_KINDS = (PREFIX, CHUNK)

_CONTEXT_HEAD, _CONTEXT_TAIL = prompts.ANSWER.split("{context}")   # "Context:\n", "\n\nQuestion: ..."
_QUESTION_HEAD = _CONTEXT_TAIL.split("{question}")[0]                # "\n\nQuestion: "
_SEPARATOR = "\n\n"                                                   # between passages (synthesis._context)


@dataclass(frozen=True)
class Segment:
    start: int          # first token index in the prompt
    end: int            # one past the last token
    kind: str           # prefix | chunk | glue | suffix

    @property
    def reused(self) -> bool:
        return self.kind in REUSED_KINDS

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SegmentedPrompt:
    token_ids: tuple[int, ...]
    segments: tuple[Segment, ...]   # cover token_ids in order, no gaps
    chunk_context: tuple[int, ...]  # tokens a chunk's stored KV was computed after

    def __len__(self) -> int:
        return len(self.token_ids)

    def ids(self, seg: Segment) -> tuple[int, ...]:
        return self.token_ids[seg.start:seg.end]

    def context(self, seg: Segment) -> tuple[int, ...]:
        """The tokens `seg`'s stored KV was computed after: none for the prefix."""
        return self.chunk_context if seg.kind == CHUNK else ()

    @property
    def num_reused_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments if s.reused)

    @property
    def num_chunk_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments if s.kind == CHUNK)

    @property
    def num_fresh_tokens(self) -> int:
        return len(self.token_ids) - self.num_reused_tokens


def from_pieces(tokenizer: Any, pieces: Sequence[tuple[str, str]],
                chunk_context: str = "prefix") -> SegmentedPrompt:
    """Tokenize the concatenated (kind, text) pieces as one text and cut it into segments.

    `chunk_context` ("prefix" | "first_token") picks the tokens chunks are computed after;
    "prefix" needs a leading prefix piece and falls back to the first token without one.

    The token ids are exactly the whole text's (so the prompt equals a normal prefill's).
    A token belongs to the piece its first character is in; a token that runs past the end
    of its piece (a BPE merge across the cut) becomes a glue token, always recomputed.
    """
    text = "".join(t for _, t in pieces)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        raise ValueError("a segmented prompt needs at least one token")
    ends, kinds, pos = [], [], 0     # char end and kind of each piece
    for kind, piece in pieces:
        pos += len(piece)
        ends.append(pos)
        kinds.append(kind)
    spans: list[list] = []           # [start token, end token, (piece index, kind)]
    p = 0
    for t, (start, end) in enumerate(offsets):
        while p < len(ends) - 1 and start >= ends[p]:
            p += 1
        key = (p, kinds[p] if end <= ends[p] else GLUE)
        if spans and spans[-1][2] == key:
            spans[-1][1] = t + 1
        else:
            spans.append([t, t + 1, key])
    segments = tuple(Segment(a, b, key[1]) for a, b, key in spans)
    cut = segments[0].end if segments[0].kind == PREFIX and chunk_context == "prefix" else 1
    return SegmentedPrompt(tuple(ids), segments, tuple(ids[:cut]))


def answer_pieces(rendered: str, user: str, num_chunks: int) -> list[tuple[str, str]] | None:
    """Split a rendered chat prompt whose last user message is `prompts.ANSWER` over
    `num_chunks` passages. None when the layout is not found (the caller prefills normally)."""
    at = rendered.rfind(user)
    if at < 0 or num_chunks < 1 or not user.startswith(_CONTEXT_HEAD):
        return None
    context_end = user.rfind(_QUESTION_HEAD)
    if context_end < 0:
        return None
    context = user[len(_CONTEXT_HEAD):context_end]
    markers: list[tuple[int, int]] = []   # (start, end) of each "[i]" marker in `context`
    pos = 0
    for i in range(1, num_chunks + 1):
        if i == 1:
            found = 0 if context.startswith("[1]") else -1
        else:
            found = context.find(f"{_SEPARATOR}[{i}]", pos)
            found = found + len(_SEPARATOR) if found >= 0 else -1
        if found < 0:
            return None
        markers.append((found, found + len(f"[{i}]")))
        pos = markers[-1][1]
    base = at + len(_CONTEXT_HEAD)          # context offset in the rendered text
    tail = rendered[base + len(context):]   # starts with _QUESTION_HEAD
    pieces = [(PREFIX, rendered[:base + markers[0][1]])]
    for i, (_, end) in enumerate(markers):
        if i + 1 < num_chunks:
            start, stop = markers[i + 1]
            pieces.append((CHUNK, context[end:start]))   # ends with the separator
            pieces.append((GLUE, context[start:stop]))
        else:
            pieces.append((CHUNK, context[end:] + _SEPARATOR))
    pieces.append((SUFFIX, tail[len(_SEPARATOR):]))
    return pieces


def segment_call(tokenizer: Any, call: LLMCall,
                 chunk_context: str = "prefix") -> SegmentedPrompt | None:
    """Segment an answer call (stuff, reduce, first refine step) for blending.

    None when the call names no chunks or is not in the `prompts.ANSWER` layout.
    """
    if not call.chunk_ids or not call.messages or call.messages[-1][0] != "user":
        return None
    messages = [{"role": r, "content": c} for r, c in call.messages]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pieces = answer_pieces(rendered, call.messages[-1][1], len(call.chunk_ids))
    return None if pieces is None else from_pieces(tokenizer, pieces, chunk_context)

