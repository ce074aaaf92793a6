"""Headline benchmark: the default pair on LM Studio's three prompts, greedy, 200 tokens, no-draft vs
draft side by side in one run. Extra arguments go to `tandem bench` (e.g. --reps 5, --model, --draft).

    .venv/bin/python bench/spec_bench.py [--out bench/out]
"""

import sys

from tandem.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "quicksort", "pythagoras", "dc-trip", "--max-tokens", "200",
                   *sys.argv[1:]]))
