"""Training objectives, chosen by name through explicit registries.

`LOSSES`: name -> `LossSpec` of an in-batch contrastive loss
`fn(scores_qc, positive_qc, valid_qc) -> (loss, aux)` (`contrastive.py`;
`sharded_contrastive` runs any of them shard by shard), plus how the data
side builds examples. `LISTWISE_LOSSES`: name -> `fn(scores_bn, labels_bn,
valid_bn) -> (loss, aux)` from `listwise.py` (`margin_mse` has its own
arguments and is called directly). `HASHING_LOSSES`: BPR's two losses
(`bpr.py`), each on its own score matrix. Regularisers: `regularizers.py`.
"""

from collections.abc import Callable
import dataclasses

from retrieval_jax.losses import bpr
from retrieval_jax.losses import contrastive
from retrieval_jax.losses import listwise
from retrieval_jax.losses import moco
from retrieval_jax.losses import regularizers
from retrieval_jax.losses import sharded_contrastive

__all__ = [
    "HASHING_LOSSES",
    "LISTWISE_LOSSES",
    "LOSSES",
    "LossSpec",
    "bpr",
    "contrastive",
    "get_loss",
    "listwise",
    "moco",
    "regularizers",
    "sharded_contrastive",
]

ONE = "one"  # a single positive per example
ALL = "all"  # every positive of the query, up to the configured maximum
PAIR = "pair"  # one example per judged (query, positive) pair
QUERY = "query"  # one example per query


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """A contrastive objective and the batch construction it expects.

  Attributes:
    fn: `fn(scores_qc, positive_qc, valid_qc) -> (loss, aux)`.
    positives: ONE or ALL (in the first slots of the query's group).
    unit: PAIR or QUERY.
    description: one line for logs and docs.
  """

  fn: Callable
  positives: str
  unit: str
  description: str

  def __post_init__(self):
    if self.positives not in (ONE, ALL):
      raise ValueError(f"positives={self.positives!r}: use 'one' or 'all'")
    if self.unit not in (PAIR, QUERY):
      raise ValueError(f"unit={self.unit!r}: use 'pair' or 'query'")


LOSSES: dict[str, LossSpec] = {
    # Needs cosine scores: config.loss.temperature = 1, normalised towers.
    "orthogonal_projection": LossSpec(
        contrastive.orthogonal_projection,
        ALL,
        QUERY,
        "(1 - mean positive cosine) + |mean negative cosine| per query; "
        "works with one-query batches (long-document fine-tuning).",
    ),
    "infonce": LossSpec(
        contrastive.info_nce,
        ONE,
        PAIR,
        "InfoNCE over in-batch + hard negatives; every judged pair is an "
        "example (DPR).",
    ),
    "symmetric_infonce": LossSpec(
        contrastive.symmetric_info_nce,
        ONE,
        PAIR,
        "Half query->passage InfoNCE, half passage->query over the B "
        "positives.",
    ),
    # "infonce" with one example per query, its positive cycling by epoch.
    "rand1_lh": LossSpec(
        contrastive.info_nce,
        ONE,
        QUERY,
        "InfoNCE with one positive per query per epoch, cycling through its "
        "positives (Rand1LH).",
    ),
    "joint_lh": LossSpec(
        contrastive.joint_lh,
        ALL,
        QUERY,
        "Sum over positives of -log softmax, other positives in the "
        "denominator (JointLH).",
    ),
    "sum_marg_lh": LossSpec(
        contrastive.sum_marg_lh,
        ALL,
        QUERY,
        "-log of the softmax mass on all positives (SumMargLH).",
    ),
    "lse_pair": LossSpec(
        contrastive.lse_pair,
        ALL,
        QUERY,
        "log(1 + sum over positive-negative pairs of exp(s_n - s_p)) "
        "(LSEPair).",
    ),
}

LISTWISE_LOSSES: dict[str, Callable] = {
    "bce": listwise.pointwise_bce,
    "kl_distillation": listwise.kl_distillation,
    "listnet": listwise.listnet,
    "listmle": listwise.listmle,
    "approx_ndcg": listwise.approx_ndcg,
    "wasserstein_list": listwise.wasserstein_list,
}

# Learning-to-hash (BPR): `fn(scores_qc, positive_qc, valid_qc)` each.
HASHING_LOSSES = {
    "bpr_candidate": bpr.candidate_loss,
    "bpr_rerank": bpr.rerank_loss,
}


def get_loss(name: str) -> LossSpec:
  """The `LossSpec` registered as `name` in `LOSSES`.

  Raises:
    ValueError: unknown name; the message lists the known ones.
  """
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(
        f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}"
    ) from None
