"""`trainer` command line: pretrain teachers, prune students, distill them from caches, evaluate.

Each subcommand lives in `trainer/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`. The trainer never runs a teacher: it reads caches through logitcache's reader.
"""

from __future__ import annotations

import sys

from logitcache.cli import build_parser, run_cli

COMMANDS = {
    "pretrain": "plain next-token training of a model on packed token windows",
    "prune": "structured pruning (heads, FFN, hidden, layers) ranked by importance",
    "distill": "train a student from a teacher's cache with tail-exact KD losses",
    "evaluate": "held-out CE of a model (and KL to a teacher cache)",
    "plan": "which teacher to cache: the distillation law's predicted student loss per candidate",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("trainer", "trainer", COMMANDS, __doc__.splitlines()[0])
    return run_cli("trainer", parser, argv)


if __name__ == "__main__":
    sys.exit(main())
