"""Train students from teacher caches: KD losses, structured pruning, held-out evaluation.

    from trainer import distill_loss, forward_kl, prune_to_dir

The names below load their submodule on first use, so ``import trainer`` (and the
``trainer`` command's ``--help``) stays free of torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "NEG_INF_LOGPROB_FLOOR",
    "SUPPORTED_ARCHITECTURES",
    "Importance",
    "LossInputError",
    "LossKind",
    "Payload",
    "batch_distill_loss",
    "check_supported",
    "compute_importance",
    "count_parameters",
    "cross_entropy",
    "distill_loss",
    "estimate_parameters",
    "evaluate_cache",
    "evaluate_windows",
    "forward_kl",
    "full_divergence",
    "full_kl",
    "generalized_jsd",
    "log1mexp",
    "payload_of",
    "plan_for_target",
    "prune_model",
    "prune_to_dir",
    "reverse_kl",
    "sampled_kd_loss",
    "student_topk_and_tail",
]

# the submodule that defines each name of __all__
_HOME: dict[str, str] = {
    **dict.fromkeys(("evaluate_cache", "evaluate_windows"), "trainer.evaluate"),
    **dict.fromkeys(("SUPPORTED_ARCHITECTURES", "Importance", "check_supported", "compute_importance",
                     "count_parameters", "estimate_parameters", "plan_for_target", "prune_model", "prune_to_dir"),
                    "trainer.prune"),
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME.get(name, "trainer.losses")), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
