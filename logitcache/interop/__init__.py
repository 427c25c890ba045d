"""Other tools' distillation datasets in and out of logitcache caches.

    from logitcache.interop import export_axolotl, import_axolotl

    export_axolotl("CACHE", "OUT")               # a folder axolotl's KD plugin trains on
    import_axolotl("SRC", "CACHE", vocab_size=V) # such a dataset back as a cache

docs/interop.md describes the layouts and what each conversion keeps and loses.
"""

from __future__ import annotations

from logitcache.interop.axolotl import export_axolotl
from logitcache.interop.axolotl_import import import_axolotl

__all__ = ["export_axolotl", "import_axolotl"]
