"""A multi-turn chat: the time to first token of each turn.

A long system prompt, then --turns questions; each answer (--max-tokens greedy tokens) is appended to the
conversation, so turn n's prompt holds every earlier turn. Conversations: Tandem as configured (the prompt
prefix its KV cache still holds is reused), the same with cache_prompt false (every prompt decoded cold),
Tandem without a draft, and with --llama-server PATH, llama-server with its prompt cache on (same model,
context and threads; no draft). The time to first token is each side's own prompt time: Tandem's
stats.prompt_time (the main model's prompt and the first token; the draft catches up after it), llama-server's
timings.prompt_ms.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem.benchmarks.common import add_model_arguments, draft_file, one_main, positive_int
from tandem.benchmarks.peer import LlamaServerPeer, PeerSettings
from tandem.config import ModelOptions
from tandem.runtime import Runtime
from tandem.spec.generate import Done, GenParams, Token

HELP = "multi-turn chat: time to first token per turn, prefix reuse vs cold, vs llama-server"
"""One line for `tandem bench --help`."""

SYSTEM = ("You are a careful assistant for a small engineering team. Answer in plain English, briefly, and say "
          "when you are not sure. The team builds web services in Python, keeps its code in one repository, "
          "reviews every change, deploys twice a week and writes tests before fixing bugs. ") * 4
QUESTIONS = ("How should we name our feature branches?", "What belongs in a good commit message?",
             "How long should a code review take?", "When should we split a function in two?",
             "How do we keep our tests fast?", "What should a bug report contain?",
             "How do we roll back a bad deploy?", "What should we write in the README?",
             "How do we onboard a new engineer?", "When is a rewrite worth it?")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None)
    p.add_argument("--turns", type=positive_int, default=8, help=f"turns (at most {len(QUESTIONS)}; default: 8)")
    p.add_argument("--max-tokens", type=positive_int, default=48, help="tokens per answer (default: 48)")
    p.add_argument("--ctx-size", type=positive_int, default=4096, help="context size (default: 4096)")
    p.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                   help="also run llama-server at PATH (prompt cache on, no draft) as a peer")


def _conversation(rt: Runtime, turns: int, gp: GenParams, *, use_draft: bool) -> list[tuple[int, int, float]]:
    """(prompt tokens, tokens reused, seconds to the first token) per turn of one conversation."""
    rt.forget_prefix()
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        prompt = rt.prompt(messages=messages)
        ids: list[int] = []
        for ev in rt.generate(prompt, gp, use_draft=use_draft):
            if isinstance(ev, Token):
                ids.append(ev.id)
            elif isinstance(ev, Done):
                rows.append((len(prompt), ev.stats.cached_tokens, ev.stats.prompt_time))
        messages.append({"role": "assistant", "content": rt.main_model.detokenize(ids)})
    return rows


def _peer_conversation(peer: LlamaServerPeer, rt: Runtime, turns: int, max_tokens: int) -> list[float]:
    """llama-server's prompt time per turn of the same conversation (its answers appended; cache on)."""
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        result = peer.complete(rt.prompt(messages=messages), max_tokens, cache_prompt=True)
        out.append(result.time_to_first_token)
        messages.append({"role": "assistant", "content": rt.main_model.detokenize(result.token_ids)})
    return out


def main(args: argparse.Namespace) -> int:
    turns = min(args.turns, len(QUESTIONS))
    main_path, draft = one_main(args), draft_file(args)
    rt = Runtime(ModelOptions(model=str(main_path), draft=str(draft), ctx_size=args.ctx_size, threads=args.threads),
                 announce=lambda _s: None)
    peer = None
    try:
        gp = GenParams(max_tokens=args.max_tokens)
        runs = {"default": _conversation(rt, turns, gp, use_draft=True),
                "default, cold": _conversation(rt, turns, GenParams(max_tokens=args.max_tokens, cache_prompt=False),
                                               use_draft=True),
                "no-draft": _conversation(rt, turns, gp, use_draft=False)}
        peer_ttft = None
        if args.llama_server is not None:
            peer = LlamaServerPeer(args.llama_server, PeerSettings(main=main_path, ctx_size=args.ctx_size,
                                                                   threads=args.threads or 2,
                                                                   cache_type_k="f16", cache_type_v="f16"))
            peer.start()
            peer_ttft = _peer_conversation(peer, rt, turns, args.max_tokens)
    finally:
        if peer is not None:
            peer.close()
        rt.close()
    names = list(runs)
    print(f"main {main_path.name}, draft {draft.name}{' (paused: cannot pay here)' if rt.draft_paused else ''}; "
          f"{turns} turns, {args.max_tokens} tokens each\n")
    head = " | ".join(f"{n} s" for n in names) + (" | llama-server s" if peer_ttft else "")
    print(f"| turn | prompt tokens | reused | {head} |")
    print("|---:|---:|---:|" + "---:|" * (len(names) + (1 if peer_ttft else 0)))
    for i in range(turns):
        cells = " | ".join(f"{runs[n][i][2]:.3f}" for n in names) + (f" | {peer_ttft[i]:.3f}" if peer_ttft else "")
        print(f"| {i + 1} | {runs['default'][i][0]} | {runs['default'][i][1]} | {cells} |")
    last = {n: runs[n][-1][2] / runs[n][0][2] for n in names}
    ratios = ", ".join(f"{n} {r:.2f}x" for n, r in last.items())
    if peer_ttft:
        ratios += f", llama-server {peer_ttft[-1] / peer_ttft[0]:.2f}x; last turn, default / llama-server: " \
                  f"{runs['default'][-1][2] / peer_ttft[-1]:.2f}x"
    print(f"\nlast turn / first turn: {ratios}")
    return 0
