"""CacheBlend through LMCache on a GPU vLLM server: the blend prompt layout. Pure functions.

LMCache (LMCacheConnectorV1 with `enable_blending`) splits a prompt's token ids on the ids
of `blend_special_str` and keys each segment's KV by its tokens alone, so a retrieved chunk's
KV is reused wherever the chunk lands. The prompt must therefore be token ids laid out as

    sys + sep + chunk_1 + sep + chunk_2 + ... + sep + chunk_n + sep + question

(LMCache examples/blend_kv_v1), sent to /v1/completions as `prompt` ids:

    sys       chat-template head + the user message up to its first passage ("Context:\\n")
    chunk_i   one passage, "title\\ntext", tokenized alone. The "[i] " marker ragserve's
              prompts put before a passage is dropped: it changes with the chunk's rank
              and would make the same chunk a different segment at another position.
    question  the rest of the user message ("\\n\\nQuestion: ...\\nAnswer:") + template tail
    sep       `tokenizer.encode(blend_special_str)[1:]`, exactly what LMCache searches for
              (its SegmentTokenDatabase drops the first id, meant to be BOS)

Only calls whose last user message has the passages-then-question layout of
`prompts.ANSWER`, `MAP_RERANK` and `MAP_SUMMARY` are laid out this way; others (refine) go
through chat completions unchanged. None of this runs on CPU: LMCache blending needs a CUDA
vLLM build (see docs/vllm.md); the tests check the layout only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

_QUESTION_HEAD = "\n\nQuestion: "   # where every passage layout's context ends (ragserve.prompts)
_PASSAGE_SEPARATOR = "\n\n"          # between passages (synthesis._context)


@dataclass(frozen=True)
class ContextLayout:
    """A user message cut around its passages."""

    head: str                    # text before the first passage's "[1] " marker
    passages: tuple[str, ...]    # each passage without its "[i] " marker or separator
    tail: str                    # from "\n\nQuestion: " to the end


def split_context(user: str, num_passages: int) -> ContextLayout | None:
    """Find `num_passages` passages "[1] ...", "[2] ..." followed by the question.

    None when the message does not have that layout (the call is sent unblended)."""
    if num_passages < 1:
        return None
    start = user.find("[1] ")
    end = user.rfind(_QUESTION_HEAD)
    if start < 0 or end < start or (start > 0 and user[start - 1] != "\n"):
        return None
    context = user[start:end]
    bounds: list[int] = [0]   # start offsets of each marker in `context`
    for i in range(2, num_passages + 1):
        at = context.find(f"{_PASSAGE_SEPARATOR}[{i}] ", bounds[-1] + 1)
        if at < 0:
            return None
        bounds.append(at)
    bounds.append(len(context))
    passages = []
    for i in range(num_passages):
        piece = context[bounds[i]:bounds[i + 1]]
        if i:
            piece = piece[len(_PASSAGE_SEPARATOR):]
        marker = f"[{i + 1}] "
        if not piece.startswith(marker):
            return None
        passages.append(piece[len(marker):])
    return ContextLayout(head=user[:start], passages=tuple(passages), tail=user[end:])


def chat_frame(full_ids: Sequence[int], empty_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Template head and tail ids around the last user message.

    `full_ids`: the chat rendered with the real user message; `empty_ids`: the same chat with
    that message empty. Their common prefix is the head, their common suffix (not overlapping
    it) the tail."""
    n = 0
    limit = min(len(full_ids), len(empty_ids))
    while n < limit and full_ids[n] == empty_ids[n]:
        n += 1
    m = 0
    while m < limit - n and full_ids[len(full_ids) - 1 - m] == empty_ids[len(empty_ids) - 1 - m]:
        m += 1
    return list(full_ids[:n]), list(full_ids[len(full_ids) - m:])


def separator_ids(encoded_with_special_tokens: Sequence[int]) -> list[int]:
    """LMCache's separator: `tokenizer.encode(blend_special_str)` without its first id."""
    ids = list(encoded_with_special_tokens[1:])
    if not ids:
        raise ValueError(f"blend_special_str encodes to {list(encoded_with_special_tokens)}: nothing is left "
                         "after dropping the first id, so LMCache could not split on it; use a longer string")
    return ids


def blend_prompt(sys_ids: Sequence[int], chunk_ids: Sequence[Sequence[int]], question_ids: Sequence[int],
                 sep_ids: Sequence[int]) -> list[int]:
    """sys + sep + chunk_1 + sep + ... + chunk_n + sep + question, as one id list."""
    out = list(sys_ids)
    for chunk in chunk_ids:
        out += sep_ids
        out += chunk
    out += sep_ids
    out += question_ids
    return out


def contains(ids: Sequence[int], sub: Sequence[int]) -> bool:
    """Whether `sub` occurs in `ids` (a chunk that contains the separator would be split)."""
    n = len(sub)
    return n > 0 and any(list(ids[i:i + n]) == list(sub) for i in range(len(ids) - n + 1))
