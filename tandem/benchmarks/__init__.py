"""What `tandem bench` measures. `compare` (with `peer`, llama-server as a peer) runs configurations side by
side, the command's default; every other mode is one module here with `HELP` (one line), `add_arguments(parser)`
and `main(args) -> int`; its docstring is the mode's --help description. docs/benchmarks.md gives, for each
table, the mode and options that produce it."""

from __future__ import annotations

MODES = ("costs", "window", "exactness", "rows", "payoff", "kv-types", "fit", "chat", "batch", "serve", "soak", "fuzz",
         "memory", "grammar", "replicas", "disconnect", "trace", "same-text",
         "suffix", "agent")
"""`tandem bench MODE`: each is the module tandem.benchmarks.<MODE with '-' as '_'>."""


def module_name(mode: str) -> str:
    return f"tandem.benchmarks.{mode.replace('-', '_')}"
