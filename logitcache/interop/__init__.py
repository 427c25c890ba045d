"""Other tools' distillation datasets in and out of logitcache caches.

    from logitcache.interop import export_axolotl, import_axolotl

    export_axolotl("CACHE", "OUT")               # a folder axolotl's KD plugin trains on
    import_axolotl("SRC", "CACHE", vocab_size=V) # such a dataset back as a cache

    from logitcache.interop import ExportSettings, ImportSettings, export_distillkit, import_distillkit

    export_distillkit(ExportSettings("CACHE", Path("OUT"), config="recommended"))  # DistillKit's compressed layout
    import_distillkit(ImportSettings("SRC", Path("CACHE")))                        # a DistillKit capture as a cache

docs/interop.md describes the layouts and what each conversion keeps and loses.
"""

from __future__ import annotations

from logitcache.interop.axolotl import export_axolotl
from logitcache.interop.axolotl_import import import_axolotl
from logitcache.interop.distillkit_capture import ImportSettings
from logitcache.interop.distillkit_export import ExportSettings, export_distillkit
from logitcache.interop.distillkit_import import import_distillkit

__all__ = ["ExportSettings", "ImportSettings", "export_axolotl", "export_distillkit", "import_axolotl",
           "import_distillkit"]
