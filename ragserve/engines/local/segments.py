"""Prompt segmentation for chunk-KV reuse: which tokens of a prompt may come from stored KV.

A blendable prompt is tokenized in pieces whose token ids are concatenated, cut from the
call's `PromptContext` (the structure its user message was rendered from, never re-parsed):

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
from ragserve.domain import LLMCall, PromptContext

PREFIX, CHUNK, GLUE, SUFFIX = "prefix", "chunk", "glue", "suffix"
REUSED_KINDS = (PREFIX, CHUNK)



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


def answer_pieces(rendered_head: str, context: PromptContext, rendered_tail: str) -> list[tuple[str, str]]:
    """The (kind, text) pieces of a prompt whose last user message is `context`, between the
    chat template's text before it (`rendered_head`) and after it (`rendered_tail`)."""
    sep = prompts.PASSAGE_SEPARATOR
    n = len(context.passages)
    pieces = [(PREFIX, rendered_head + context.head + prompts.passage_marker(1))]
    for i, p in enumerate(context.passages, start=1):
        marker = prompts.passage_marker(i)
        body = prompts.format_passage(i, p.title, p.text)[len(marker):]   # " title\ntext": rank-free
        pieces.append((CHUNK, body + sep))
        if i < n:
            pieces.append((GLUE, prompts.passage_marker(i + 1)))
    pieces.append((SUFFIX, context.tail + rendered_tail))
    return pieces


def segment_call(tokenizer: Any, call: LLMCall,
                 chunk_context: str = "prefix") -> SegmentedPrompt | None:
    """Segment an answer call (stuff, reduce, map_rerank, first refine step) for blending.

    None when the call carries no passages or its passages are not in the answer layout
    (`prompts.ANSWER`'s head, whose prefix the stored chunk KV was computed after)."""
    ctx = call.context
    if ctx is None or not ctx.passages or ctx.head != prompts.ANSWER[0]:
        return None
    user = prompts.render_context(ctx)
    if not call.messages or call.messages[-1] != ("user", user):
        return None
    messages = [{"role": r, "content": c} for r, c in call.messages]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    at = rendered.rfind(user)   # where the template put the message (its text is ours, verbatim)
    if at < 0:
        return None
    pieces = answer_pieces(rendered[:at], ctx, rendered[at + len(user):])
    return from_pieces(tokenizer, pieces, chunk_context)
