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

Every call that carries passages (`LLMCall.context`: stuff, map_rerank, map, reduce, refine)
is laid out from that structure; calls without passages go through chat completions unchanged. None of this runs on CPU: LMCache blending needs a CUDA
vLLM build (see docs/vllm.md); the tests check the layout only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ragserve import prompts
from ragserve.domain import LLMCall


@dataclass(frozen=True)
class ContextLayout:
    """A user message cut around its passages."""

    head: str                    # text before the first passage's "[1] " marker
    passages: tuple[str, ...]    # each passage without its "[i] " marker or separator
    tail: str                    # the separator after the last passage, then the rest


def context_layout(call: LLMCall) -> ContextLayout | None:
    """The LMCache layout of `call`'s last user message, from the structure it was rendered
    from (`call.context`); None for a call without passages (sent unblended)."""
    ctx = call.context
    if ctx is None or not ctx.passages:
        return None
    return ContextLayout(head=ctx.head, passages=tuple(prompts.passage_text(p.title, p.text) for p in ctx.passages),
                         tail=prompts.PASSAGE_SEPARATOR + ctx.tail)


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
