"""Structured pruning of Llama-family causal LMs into smaller students (Minitron / MiniMA style).

Width pruning removes hidden channels, attention heads and FFN neurons; depth pruning drops
whole decoder layers.  The result is a fresh model of the same class with a smaller config,
holding exact slices of the original weights, so it saves and loads as an ordinary Hugging
Face checkpoint.

Supported: LlamaForCausalLM, Qwen2ForCausalLM (q/k/v biases), MistralForCausalLM, with
multi-head or grouped-query attention and tied or untied embeddings.  Anything else raises
``ValueError`` naming the architecture.

Grouped-query attention: a query head is kept only together with the KV head it reads.
Heads are pruned either uniformly inside every KV group (all KV heads kept, the same number
of query heads per group) or by dropping whole KV groups (a KV head with all its query
heads); see ``prune_model``.  ``head_dim`` never changes.

Modules: ``arch`` (supported architectures, dims, head layouts), ``importance`` (scoring
units on calibration data), ``plan`` (parameter counts, target-size search), ``surgery``
(cutting the weights, exact by construction) and ``pipeline`` (checkpoint in, student
folder out).
"""

from __future__ import annotations

from trainer.prune.arch import SUPPORTED_ARCHITECTURES, check_supported
from trainer.prune.importance import Importance, compute_importance
from trainer.prune.pipeline import prune_to_dir
from trainer.prune.plan import count_parameters, estimate_parameters, plan_for_target
from trainer.prune.surgery import prune_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Importance",
    "check_supported",
    "compute_importance",
    "count_parameters",
    "estimate_parameters",
    "plan_for_target",
    "prune_model",
    "prune_to_dir",
]
