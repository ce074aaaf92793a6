"""Log probability records (tandem.spec.logprobs) in OpenAI's response shapes (pure: no I/O).

Chat: choices[].logprobs.content[] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}.
Text completions (the legacy shape): choices[].logprobs = {tokens, token_logprobs, top_logprobs (one
{token: logprob} dict per position), text_offset (where each token starts in the choice's text, in characters,
counted over the token strings)}.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.server.schemas import ChatLogprobs, ChatTokenLogprob, TextLogprobs, TopLogprob
from tandem.spec.logprobs import Logprob, TokenLogprob


def token_string(entry: Logprob) -> str:
    """A token's text; bytes that are not whole UTF-8 characters show as U+FFFD (its `bytes` are exact)."""
    return entry.bytes.decode("utf-8", errors="replace")


def _top(entry: Logprob) -> TopLogprob:
    return TopLogprob(token=token_string(entry), logprob=entry.logprob, bytes=list(entry.bytes))


def chat_logprobs(records: Sequence[TokenLogprob]) -> ChatLogprobs:
    """The chat shape of some consecutive tokens' records."""
    return ChatLogprobs(content=[ChatTokenLogprob(token=token_string(r.chosen), logprob=r.chosen.logprob,
                                                  bytes=list(r.chosen.bytes), top_logprobs=[_top(t) for t in r.top])
                                 for r in records])


def text_logprobs(records: Sequence[TokenLogprob], offset: int = 0) -> TextLogprobs:
    """The legacy shape of some consecutive tokens' records, the first starting at character `offset` of the
    text (a stream's earlier chunks hold the text before it)."""
    tokens = [token_string(r.chosen) for r in records]
    offsets: list[int] = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return TextLogprobs(tokens=tokens, token_logprobs=[r.chosen.logprob for r in records],
                        top_logprobs=[_top_dict(r) for r in records], text_offset=offsets)


def _top_dict(record: TokenLogprob) -> dict[str, float]:
    """{token: logprob}, most likely first; of two tokens with the same text, the more likely one."""
    out: dict[str, float] = {}
    for t in record.top:
        out.setdefault(token_string(t), t.logprob)
    return out


def text_length(records: Sequence[TokenLogprob]) -> int:
    """Characters the records' token strings add to text_offset."""
    return sum(len(token_string(r.chosen)) for r in records)
