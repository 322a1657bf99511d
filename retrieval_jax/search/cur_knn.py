r"""k-NN search for black-box (cross-encoder) scorers by CUR decomposition.

annCUR (Yadav et al., EMNLP 2022) and ADACUR (Yadav et al., Findings of EMNLP
2023). A scorer is `score(query_ids [b], item_ids [b, c]) -> [b, c]`; each
pair it scores is one "CE call". Offline (`build_index`): R = score(anchor
queries, all items) [k_q, N], E = pinv(R[:, A]) R [k_i, N]. Online
(`cur_search`): c = score(q, A), ŝ = c E, re-rank the top k_r exactly, so a
query costs k_i + k_r calls; ŝ = s when rank(R[:, A]) = rank(S). The pinv
drops singular values below `rtol` × σ_max; near k_i ≈ k_q the smallest kept
ones amplify score noise (a larger rtol regularises, losing exactness).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retrieval_jax import sharding
from retrieval_jax.search import exact_topk

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


class CountingScorer:
  """Wraps a scorer; `total` and `per_query` {qid: n} count the pairs scored."""

  def __init__(self, scorer: Scorer):
    self._scorer = scorer
    self.total = 0
    self.per_query: dict[int, int] = {}

  def __call__(self, query_ids_b, item_ids_bc) -> np.ndarray:
    query_ids_b = np.asarray(query_ids_b)
    item_ids_bc = np.asarray(item_ids_bc)
    if item_ids_bc.ndim != 2 or item_ids_bc.shape[0] != query_ids_b.shape[0]:
      raise ValueError(
          f"item ids must be [b={query_ids_b.shape[0]}, c], got "
          f"{item_ids_bc.shape}"
      )
    self.total += item_ids_bc.size
    for q in query_ids_b.tolist():
      self.per_query[q] = self.per_query.get(q, 0) + item_ids_bc.shape[1]
    return np.asarray(self._scorer(query_ids_b, item_ids_bc))

  def reset(self) -> None:
    self.total = 0
    self.per_query = {}


def matrix_scorer(scores_qn) -> Scorer:
  """A scorer that reads a known [Q, N] score matrix (tests, analyses)."""
  scores_qn = np.asarray(scores_qn)

  def score(query_ids_b, item_ids_bc):
    return scores_qn[np.asarray(query_ids_b)[:, None], item_ids_bc]

  return score


def score_all(
    scorer: Scorer, query_ids, num_items: int, block: int = 4096
) -> np.ndarray:
  """[len(query_ids), num_items] scores, `block` items per scorer call."""
  query_ids = np.asarray(query_ids)
  out = []
  for lo in range(0, num_items, block):
    items = np.arange(lo, min(lo + block, num_items))
    out.append(
        scorer(query_ids, np.broadcast_to(items, (len(query_ids), len(items))))
    )
  return np.concatenate(out, axis=1)


def random_anchor_items(
    num_items: int, num_anchors: int, seed: int = 0
) -> np.ndarray:
  """int32 [k_i]: anchor items drawn uniformly without replacement."""
  if not 1 <= num_anchors <= num_items:
    raise ValueError(
        f"num_anchors={num_anchors} must be in [1, num_items={num_items}]"
    )
  rng = np.random.default_rng(seed)
  return rng.choice(num_items, num_anchors, replace=False).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class CurIndex:
  """The offline part of annCUR.

  anchor_items_k: int32 [k_i] A; items_kn: [k_i, N] E, columns sharded over
  the corpus axes; r_anc_qn: [k_q, N] R, kept for the adaptive search.
  """

  anchor_items_k: np.ndarray
  items_kn: jax.Array
  r_anc_qn: jax.Array
  rtol: float | None

  @property
  def num_items(self) -> int:
    return int(self.items_kn.shape[1])


def _corpus_sharding(mesh: Mesh) -> NamedSharding:
  # Items (columns of R and E) split like the rows of an encoded corpus.
  spec = sharding.logical_to_spec((sharding.CORPUS,))
  return NamedSharding(mesh, PartitionSpec(None, spec[0]))


def _latent_items(r_anc_qn, anchor_items_k, rtol, refine):
  c_qk = r_anc_qn[:, anchor_items_k]
  u_kq = jnp.linalg.pinv(c_qk, rtol=rtol)
  items_kn = u_kq @ r_anc_qn
  # Iterative refinement of C E = R removes E's rounding error: in float32
  # the exact-recovery error of a rank-20 matrix goes from 1.5e-6 to 3e-7.
  for _ in range(refine):
    items_kn = items_kn + u_kq @ (r_anc_qn - c_qk @ items_kn)
  return items_kn


def build_index(
    r_anc_qn,
    anchor_items_k,
    *,
    rtol: float | None = None,
    refine: int = 1,
    mesh: Mesh | None = None,
) -> CurIndex:
  """E = pinv(R[:, A]) R from float r_anc_qn [k_q, N], distinct int anchors.

  The k_q × k_i pinv is small and replicated; the O(k_i k_q N) product with R
  runs where R's column shards live. rtol None: JAX's max(k_q, k_i) · eps;
  `refine` iterative-refinement steps for E.
  """
  r_anc_qn = jnp.asarray(r_anc_qn)
  anchor_items_k = np.asarray(anchor_items_k, np.int32)
  if r_anc_qn.ndim != 2:
    raise ValueError(f"r_anc_qn must be [k_q, N], got {r_anc_qn.shape}")
  num_items = r_anc_qn.shape[1]
  if (
      anchor_items_k.ndim != 1
      or anchor_items_k.size == 0
      or anchor_items_k.min() < 0
      or anchor_items_k.max() >= num_items
      or len(set(anchor_items_k.tolist())) != anchor_items_k.size
  ):
    raise ValueError(
        f"anchor_items_k must be distinct item indices in [0, {num_items})"
    )
  mesh = sharding.make_mesh() if mesh is None else mesh
  shard = _corpus_sharding(mesh)
  shards = int(
      np.prod(
          [mesh.shape[a] for a in np.atleast_1d(shard.spec[1]) if a is not None]
      )
  )
  pad = -num_items % shards  # zero columns, cut off again below
  r_pad = jax.device_put(jnp.pad(r_anc_qn, ((0, 0), (0, pad))), shard)
  items_kn = jax.jit(
      _latent_items, static_argnames=("rtol", "refine"), out_shardings=shard
  )(r_pad, anchor_items_k, rtol=rtol, refine=refine)
  return CurIndex(anchor_items_k, items_kn[:, :num_items], r_anc_qn, rtol)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Per query, best first: int32 items_bk, scores_bk [b, k], calls_b [b].

  exact_bk [b, k] bool marks exact scores (others are ŝ, filled when k_r < k).
  """

  items_bk: np.ndarray
  scores_bk: np.ndarray
  exact_bk: np.ndarray
  calls_b: np.ndarray


def _rerank(query_ids, candidates_bc, approx_bc, scorer, k: int, k_r: int):
  """Exact scores for the first k_r candidates; the rest keep ŝ."""
  b = len(query_ids)
  exact_br = (
      np.asarray(scorer(query_ids, candidates_bc[:, :k_r]))
      if k_r
      else np.zeros((b, 0))
  )
  order_br = np.argsort(-exact_br, axis=1, kind="stable")
  items = np.concatenate(
      [
          np.take_along_axis(candidates_bc[:, :k_r], order_br, 1),
          candidates_bc[:, k_r:],
      ],
      axis=1,
  )[:, :k]
  scores = np.concatenate(
      [np.take_along_axis(exact_br, order_br, 1), approx_bc[:, k_r:]], axis=1
  )[:, :k]
  exact = np.broadcast_to(np.arange(items.shape[1]) < k_r, items.shape)
  return items.astype(np.int32), scores, exact


def cur_search(
    index: CurIndex,
    query_ids,
    scorer: Scorer,
    k: int,
    k_r: int,
    *,
    mesh: Mesh | None = None,
) -> SearchResult:
  """annCUR: anchor scores, approximate all items, re-rank the top k_r.

  query_ids: int [b]; k_r = 0 returns the approximate top k; k_i + k_r calls.
  """
  query_ids = np.asarray(query_ids)
  num_items = index.num_items
  if not 1 <= k <= num_items or not 0 <= k_r <= num_items:
    raise ValueError(
        f"need 1 <= k <= N and 0 <= k_r <= N (N={num_items}), "
        f"got k={k}, k_r={k_r}"
    )
  anchors = np.broadcast_to(
      index.anchor_items_k, (len(query_ids), len(index.anchor_items_k))
  )
  c_bk = np.asarray(scorer(query_ids, anchors))
  depth = max(k, k_r)
  # ŝ = c E is an inner-product search over the latent item columns.
  approx_bc, candidates_bc = exact_topk.exact_topk(
      jnp.asarray(c_bk, index.items_kn.dtype),
      index.items_kn.T,
      depth,
      metric="dot",
      mesh=mesh,
  )
  items, scores, exact = _rerank(
      query_ids, candidates_bc, approx_bc, scorer, k, k_r
  )
  calls = np.full(len(query_ids), len(index.anchor_items_k) + k_r)
  return SearchResult(items, scores, exact, calls)


@jax.jit
def _adaptive_approx(r_anc_qn, anchors_ba, c_ba, scored_bn, rtol=None):
  """ŝ per query from its own anchors; already scored items get −∞."""
  cols_bqa = jnp.take(r_anc_qn, anchors_ba, axis=1).transpose(1, 0, 2)
  u_baq = jax.vmap(lambda m: jnp.linalg.pinv(m, rtol=rtol))(cols_bqa)
  approx_bn = jnp.einsum("ba,baq,qn->bn", c_ba, u_baq, r_anc_qn)
  return jnp.where(scored_bn, -jnp.inf, approx_bn)


def adaptive_cur_search(
    index: CurIndex,
    query_ids,
    scorer: Scorer,
    k: int,
    budget: int,
    rounds: int,
    *,
    k_r: int = 0,
    seed: int = 0,
) -> SearchResult:
  """ADACUR: anchors chosen per query over `rounds`, `budget` calls per query.

  Round 1 scores random items; each later round approximates all items from
  the query's anchors so far (R from `index`) and scores the best unscored
  ones, which become anchors. A final k_r are re-ranked; all scores are exact.
  """
  query_ids = np.asarray(query_ids)
  b, n = len(query_ids), index.num_items
  per_round = (budget - k_r) // rounds
  if rounds < 1 or per_round < 1 or not 1 <= k <= budget <= n or k_r < 0:
    raise ValueError(
        "need rounds >= 1, (budget - k_r) // rounds >= 1 and "
        f"1 <= k <= budget <= N={n}; got k={k}, budget={budget},"
        f" rounds={rounds}, k_r={k_r}"
    )
  sizes = [per_round + (i < (budget - k_r) % rounds) for i in range(rounds)]
  rng = np.random.default_rng(seed)
  anchors_ba = np.stack(
      [rng.choice(n, sizes[0], replace=False) for _ in range(b)]
  ).astype(np.int32)
  c_ba = np.asarray(scorer(query_ids, anchors_ba))
  scored_bn = np.zeros((b, n), bool)
  np.put_along_axis(scored_bn, anchors_ba, True, axis=1)
  r_anc_qn = jnp.asarray(index.r_anc_qn)
  for size in sizes[1:] + [k_r]:
    if not size:
      continue
    approx_bn = np.asarray(
        _adaptive_approx(
            r_anc_qn,
            jnp.asarray(anchors_ba),
            jnp.asarray(c_ba, r_anc_qn.dtype),
            jnp.asarray(scored_bn),
            index.rtol,
        )
    )
    new_bs = np.argsort(-approx_bn, axis=1, kind="stable")[:, :size]
    c_new = np.asarray(scorer(query_ids, new_bs))
    anchors_ba = np.concatenate([anchors_ba, new_bs.astype(np.int32)], 1)
    c_ba = np.concatenate([c_ba, c_new], 1)
    np.put_along_axis(scored_bn, new_bs, True, axis=1)
  order_ba = np.argsort(-c_ba, axis=1, kind="stable")[:, :k]
  items = np.take_along_axis(anchors_ba, order_ba, 1).astype(np.int32)
  return SearchResult(
      items,
      np.take_along_axis(c_ba, order_ba, 1),
      np.ones(items.shape, bool),
      np.full(b, anchors_ba.shape[1]),
  )


def retrieve_and_rerank(
    query_ids, ranking_bn, scorer: Scorer, k: int, budget: int
) -> SearchResult:
  """Baseline: a first stage's top `budget` items re-scored exactly.

  ranking_bn: int [b, n] first-stage order, -1 padded; a query's calls are its
  first min(budget, ranked) items (calls_b). The tail past them keeps the
  first-stage order with score -inf (-1 where nothing is left).
  """
  query_ids = np.asarray(query_ids)
  ranking_bn = np.asarray(ranking_bn)
  b = len(query_ids)
  if not 1 <= k or budget < 0:
    raise ValueError(f"need k >= 1 and budget >= 0, got k={k}, budget={budget}")
  real_b = np.minimum((ranking_bn >= 0).sum(1), budget)
  width = max(k, ranking_bn.shape[1])
  ranked = np.full((b, width), -1, np.int64)
  ranked[:, : ranking_bn.shape[1]] = ranking_bn
  items = np.full((b, k), -1, np.int32)
  scores = np.full((b, k), -np.inf)
  exact = np.zeros((b, k), bool)
  for r in np.unique(real_b):
    rows = np.flatnonzero(real_b == r)
    exact_r = (
        np.asarray(scorer(query_ids[rows], ranked[rows, :r]))
        if r
        else np.zeros((len(rows), 0))
    )
    order = np.argsort(-exact_r, axis=1, kind="stable")
    cand = np.concatenate(
        [np.take_along_axis(ranked[rows, :r], order, 1), ranked[rows, r:]],
        axis=1,
    )[:, :k]
    items[rows, : cand.shape[1]] = cand
    m = min(r, k)
    scores[rows, :m] = np.take_along_axis(exact_r, order, 1)[:, :m]
    exact[rows, :m] = True
  return SearchResult(items, scores, exact, real_b)


def top_k_recall(found_bk, exact_bk) -> float:
  """Mean |found top-k ∩ exact top-k| / k over queries."""
  found_bk, exact_bk = np.asarray(found_bk), np.asarray(exact_bk)
  if found_bk.shape != exact_bk.shape:
    raise ValueError(f"shapes differ: {found_bk.shape} vs {exact_bk.shape}")
  hits = [
      len(set(f) & set(e)) for f, e in zip(found_bk.tolist(), exact_bk.tolist())
  ]
  return float(np.mean(hits)) / found_bk.shape[1]
