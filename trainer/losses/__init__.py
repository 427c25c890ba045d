"""Knowledge-distillation losses against a cached, truncated teacher distribution.

A top-k cache stores, per position, the teacher's top-k token ids, their log-probs
(normalised over the *full* vocabulary) and ``tail_logmass = log(1 - sum_i p_i)``,
the exact log of the probability mass outside the top-k.  Together these define a
proper (k+1)-way distribution: the k cached tokens plus one "tail" bucket.  The
student's full softmax collapses onto the same k+1 outcomes (its log-probs at the
cached ids, plus its own mass outside them), so every divergence here is an exact
divergence between two (k+1)-way distributions.  By the data-processing
inequality it lower-bounds the full-vocabulary divergence, equals it when
k == V, and -- unlike the common "renormalise over the top-k" shortcut -- it
penalises a student that puts too much (or too little) mass outside the teacher's
top-k.  A sampled cache stores draws instead; :func:`sampled_kd_loss` is unbiased
for full-vocabulary forward KL from them.  docs/losses.md has the math.

Modules: ``common`` (numerics, argument checks), ``buckets`` (the (k+1)-way
buckets), ``divergence`` (KL/JSD rows), ``topk`` (the top-k + tail losses),
``sampled`` (random-sampling KD), ``full`` (CE, full-vocabulary divergences) and
``batch`` (a cache batch's payload picks the estimator).

Conventions shared by every function:

* ``student_logits`` is ``[N, V]`` (a flattened batch of positions) in any float
  dtype; it is upcast to at least float32 before any softmax / logsumexp so that
  bf16 logits do not lose the tail.  float64 input stays float64 (gradcheck).
* ``topk_ids`` ``[N, k]`` integer, distinct within a row; ``topk_logprobs``
  ``[N, k]`` and ``tail_logmass`` ``[N]`` may contain ``-inf`` (probability 0).
* ``mask`` ``[N]`` bool selects the positions that count.  Losses are means over
  the masked positions; an all-masked batch gives exactly 0 with a (zero)
  gradient.  Rows outside the mask may hold padding (ids -100, NaN log-probs):
  they are replaced by a harmless dummy row before any arithmetic, so they can
  neither crash ``gather`` nor leak NaN into gradients.
* KL terms with zero probability on the "from" side contribute exactly 0, never
  ``0 * inf = NaN``.
* Tensors of the wrong shape or dtype raise :class:`LossInputError` (a ``ValueError``).
"""

from __future__ import annotations

from trainer.losses.batch import Payload, batch_distill_loss, payload_of

# ``_student_buckets`` is private, re-exported (``as``) for the tests that check the fused buckets.
from trainer.losses.buckets import _student_buckets as _student_buckets
from trainer.losses.buckets import student_topk_and_tail
from trainer.losses.common import NEG_INF_LOGPROB_FLOOR, LossInputError, LossKind, log1mexp
from trainer.losses.full import cross_entropy, full_divergence, full_kl
from trainer.losses.sampled import sampled_kd_loss
from trainer.losses.topk import distill_loss, forward_kl, generalized_jsd, reverse_kl

__all__ = [
    "NEG_INF_LOGPROB_FLOOR",
    "LossInputError",
    "LossKind",
    "Payload",
    "batch_distill_loss",
    "cross_entropy",
    "distill_loss",
    "forward_kl",
    "full_divergence",
    "full_kl",
    "generalized_jsd",
    "log1mexp",
    "payload_of",
    "reverse_kl",
    "sampled_kd_loss",
    "student_topk_and_tail",
]
