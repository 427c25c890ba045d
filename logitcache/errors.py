"""Exceptions for mistakes a user can fix; the CLIs print them as one line, never a traceback."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input, a mismatch, or a refusal that the user can act on.

    The message must name the offending input (a path, a setting, a value) and fit on one line.
    """


class SettingError(UserError):
    """A setting with a value that cannot work: `seq_len 64: a window of ...`.

    The library names the setting as its configuration does (`seq_len`); a command line relabels
    it with its own option (`--seq-len`) through `relabel`.
    """

    def __init__(self, setting: str, value: Any, problem: str):
        self.setting, self.value, self.problem = setting, value, problem
        super().__init__(self.render(setting))

    def render(self, label: str) -> str:
        return f"{label}: {self.problem}" if self.value is None else f"{label} {self.value}: {self.problem}"

    def relabel(self, label: str) -> UserError:
        """The same error naming the setting as `label` (a command-line option, say)."""
        return UserError(self.render(label))


def exception_line(exc: BaseException) -> str:
    """`ClassName: first non-empty line of the message` (cut at 300 characters), for one-line errors."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
