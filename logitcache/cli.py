"""`logitcache` command line: produce, inspect and verify caches of teacher top-k distributions.

Each subcommand lives in `logitcache/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`; this file only wires them and turns user mistakes into one-line errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from logitcache.errors import SettingError, UserError

COMMANDS = {
    "produce": "run teachers over a corpus and write their top-k caches",
    "inspect": "summarise a cache: teacher, k, windows, bytes/token, top-k mass",
    "verify": "check every shard of a cache against its manifest's sha256 (exit 1 on any mismatch)",
    "repair": "move a cache's bad shards aside, unlist them, and print the produce command that re-creates them",
    "push": "upload a cache to a URL (s3://, hf://, file://): resumable, verified, manifest last",
    "pull": "download a cache from a URL into a folder, verifying every shard",
    "import": "import another trainer's distillation dataset (axolotl KD, DistillKit captures) as a cache",
    "export": "export a top-k cache as another trainer's distillation dataset (axolotl KD, DistillKit)",
}
# Subcommands whose module has another name: `import` is a Python keyword, so commands/import_cache.py.
MODULES = {"import": "import_cache", "export": "export_cache"}


def build_parser(prog: str, package: str, commands: dict[str, str], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in commands.items():
        module = importlib.import_module(f"{package}.commands.{MODULES.get(name, name)}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Library messages as plain lines on whatever `sys.stderr` is at the time of each message."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:   # StreamHandler.__init__ sets it; the property always wins
        pass


def show_library_messages(*packages: str) -> None:
    """Print the packages' log messages (INFO and up) on stderr: the library speaks through
    `logging` and is quiet when embedded; a command line shows what it says."""
    for name in packages:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def option_label(setting: str) -> str:
    """The command-line option of a library setting: `seq_len` -> `--seq-len`."""
    return "--" + setting.replace("_", "-")


def run_cli(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and dispatch; a UserError becomes `prog: error: ...` on stderr and exit status 2 (a
    SettingError names the setting by its option)."""
    args = parser.parse_args(argv)
    show_library_messages("logitcache", prog)
    try:
        return int(args._run(args) or 0)
    except SettingError as exc:
        print(f"{prog}: error: {exc.render(option_label(exc.setting))}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # disk full, file too large, permissions: the system's words, one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}; nothing half-written is kept, run the same command "
              "again once this is fixed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("logitcache", "logitcache", COMMANDS, __doc__.splitlines()[0])
    return run_cli("logitcache", parser, argv)


if __name__ == "__main__":
    sys.exit(main())
