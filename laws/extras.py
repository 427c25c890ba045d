"""The optional dependencies of ``laws`` (scipy, matplotlib): imported on first use, or one line on how to get them."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'logitcache[laws]'"
EXTRA_MODULES = ("scipy", "matplotlib")


class MissingExtraError(ImportError):
    """scipy or matplotlib is missing; the message is one line ending in :data:`INSTALL_HINT`."""


@functools.cache
def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise MissingExtraError(f"the scaling-law analysis needs {package}, which is not installed: "
                                f"{INSTALL_HINT}") from exc


def ensure_installed() -> None:
    """Fail now, not after a long sweep, when any of :data:`EXTRA_MODULES` is missing."""
    for module in EXTRA_MODULES:
        require(module)
