r"""Rank notions of binary qrel matrices: certificates, searches and bounds.

"On the Theoretical Limitations of Embedding-Based Retrieval" (Weller et al.,
arXiv 2508.21038) asks which qrel matrices A in {0,1}^{m x n} (queries x
documents) d-dimensional embeddings can realise, i.e. for which A some score
matrix B = U V^T of rank <= d (U [m, d] queries, V [n, d] documents) puts
every query's relevant documents where they belong:

* row-wise order-preserving rank rank_rop(A): the least rank of a B with
  A_ij > A_ik => B_ij > B_ik in every row;
* row-wise thresholdable rank rank_rt(A): the least rank of a B with
  per-row thresholds tau_i such that B_ij > tau_i iff A_ij = 1;
* globally thresholdable rank rank_gt(A): the same with one tau;
* sign rank rank_pm(M) of M in {-1,+1}^{m x n}: the least rank of a B with
  sign(B) = M (every entry nonzero).

They form the chain

  rank_pm(2A - 1) - 1 <= rank_rop(A) = rank_rt(A) <= rank_gt(A)
                      <= rank_pm(2A - 1).

Each link is a transform of certificates, implemented below:

* rop -> rt (`rop_to_rt`): with 0/1 rows, "every relevant score above every
  irrelevant one" is "a threshold between them"; take the midpoint of the
  lowest relevant and the highest irrelevant score. rt -> rop is B itself.
* rt -> sign (`rt_to_sign`): B - tau 1^T = [U, -tau] [V, 1]^T has rank
  <= rank(B) + 1 and sign pattern 2A - 1.
* sign -> gt (`sign_to_gt`): tau = 0.
* gt -> rt (`gt_to_rt`): tau_i = tau.

Upper bounds. `search_realization` looks for a rank-d certificate: a joint
smooth fit of U, V and the thresholds, then alternating linear programs.
With V fixed, the best U (and thresholds) is a max-margin LP, and that LP
is exact (`realize_with_docs`: some U works for this V iff its optimal
margin is positive); the search around it is local, so failing to find a
certificate says nothing about the rank. A found certificate, re-checked by
the exact checkers, proves rank <= d: the search gives upper bounds only.

Lower bounds. Forster's theorem (Forster 2002, "A linear lower bound on the
unbounded error probabilistic communication complexity") gives
rank_pm(M) >= sqrt(m n) / ||M||_2 for M in {-1,+1}^{m x n}, hence
rank_rt(A) >= ceil(sqrt(m n) / ||2A - 1||_2) - 1. Small ranks are decided
exactly: sign rank 1 iff all rows of M are equal up to sign
(`is_sign_rank_one`); rank_rt(A) <= 1 iff some linear order of the
documents makes every row's relevant set a prefix or a suffix, which
`rank_one_row_threshold` decides in polynomial time; and sign rank <= 2
reduces to that test under column negations (`rank_two_sign`, exhaustive
in min(m, n), so for small matrices). `rank_bounds` combines all of these
into proven intervals for the three ranks.
"""

import dataclasses
import math

import numpy as np
from scipy import optimize
from scipy import sparse
from scipy import special

KINDS = ("rt", "gt", "sign")

# Forster's bound is rounded up to an integer; computed in float64 it may
# exceed the true value by a few ulps (a Hadamard matrix gives exactly
# sqrt(n)), so it is shrunk by this relative amount before the ceiling.
_FORSTER_RELATIVE_SLACK = 1e-9


# Input checks.


def _as_binary(name: str, a_mn) -> np.ndarray:
  """Returns a non-empty 2-D 0/1 array as float64, else raises ValueError."""
  a_mn = np.asarray(a_mn)
  if a_mn.ndim != 2 or a_mn.size == 0:
    raise ValueError(
        f"{name} must be a non-empty 2-D array, got shape {a_mn.shape}")
  if not np.isin(a_mn, (0, 1)).all():
    raise ValueError(
        f"{name} must hold only 0 and 1, got values {np.unique(a_mn)[:6]}")
  return a_mn.astype(np.float64)


def _as_sign(name: str, sign_mn) -> np.ndarray:
  """Returns a non-empty 2-D +-1 array as float64, else raises ValueError."""
  sign_mn = np.asarray(sign_mn)
  if sign_mn.ndim != 2 or sign_mn.size == 0:
    raise ValueError(
        f"{name} must be a non-empty 2-D array, got shape {sign_mn.shape}")
  if not np.isin(sign_mn, (-1, 1)).all():
    raise ValueError(
        f"{name} must hold only -1 and +1, got values "
        f"{np.unique(sign_mn)[:6]}")
  return sign_mn.astype(np.float64)


def _as_scores(name: str, b_mn, shape: tuple[int, int]) -> np.ndarray:
  """Returns finite float64 scores of the given shape, else ValueError."""
  b_mn = np.asarray(b_mn, dtype=np.float64)
  if b_mn.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {b_mn.shape}")
  if not np.isfinite(b_mn).all():
    raise ValueError(f"{name} must be finite")
  return b_mn


def _as_row_thresholds(tau_m, m: int) -> np.ndarray:
  tau_m = np.asarray(tau_m, dtype=np.float64)
  if tau_m.shape != (m,) or not np.isfinite(tau_m).all():
    raise ValueError(
        f"tau_m must be {m} finite thresholds, got shape {tau_m.shape}")
  return tau_m


def _check_margin(margin) -> float:
  margin = float(margin)
  if not margin >= 0.0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  return margin


# Exact certificate checkers. They compare floats as given: with margin = 0
# each implements its definition exactly (the sign of a float difference is
# exact, since x - y never rounds to zero for x != y).


def is_row_thresholdable(a_mn, b_mn, tau_m, margin: float = 0.0) -> bool:
  """Whether B_ij > tau_i exactly when A_ij = 1.

  With margin > 0 the relevant scores must exceed tau_i + margin and the
  irrelevant ones stay <= tau_i - margin. At margin 0 an irrelevant score
  may equal tau_i, as the definition allows.

  Args:
    a_mn: [m, n] 0/1 qrel matrix (any numeric or bool dtype).
    b_mn: float [m, n] scores.
    tau_m: float [m] per-row thresholds.
    margin: float >= 0.

  Returns:
    bool.
  """
  a_mn = _as_binary("a_mn", a_mn)
  b_mn = _as_scores("b_mn", b_mn, a_mn.shape)
  tau_m = _as_row_thresholds(tau_m, a_mn.shape[0])
  margin = _check_margin(margin)
  gap_mn = b_mn - tau_m[:, None]
  relevant_mn = a_mn == 1
  return bool((gap_mn[relevant_mn] > margin).all()
              and (gap_mn[~relevant_mn] <= -margin).all())


def is_globally_thresholdable(a_mn, b_mn, tau: float,
                              margin: float = 0.0) -> bool:
  """Whether B_ij > tau exactly when A_ij = 1, for one shared tau.

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    b_mn: float [m, n] scores.
    tau: float, the threshold of every row.
    margin: float >= 0, as in `is_row_thresholdable`.

  Returns:
    bool.
  """
  a_mn = _as_binary("a_mn", a_mn)
  tau = float(tau)
  if not math.isfinite(tau):
    raise ValueError(f"tau must be finite, got {tau}")
  return is_row_thresholdable(a_mn, b_mn, np.full(a_mn.shape[0], tau),
                              margin)


def realizes_sign_pattern(sign_mn, b_mn, margin: float = 0.0) -> bool:
  """Whether sign(B) = M entrywise, with |B_ij| > margin.

  Args:
    sign_mn: [m, n] matrix of -1 / +1.
    b_mn: float [m, n] scores; a zero entry never matches.
    margin: float >= 0.

  Returns:
    bool.
  """
  sign_mn = _as_sign("sign_mn", sign_mn)
  b_mn = _as_scores("b_mn", b_mn, sign_mn.shape)
  margin = _check_margin(margin)
  # Multiplying by +-1 is exact.
  return bool((sign_mn * b_mn > margin).all())


def is_row_order_preserving(a_mn, b_mn, margin: float = 0.0) -> bool:
  """Whether A_ij > A_ik implies B_ij - B_ik > margin in every row.

  Args:
    a_mn: float [m, n], any real target values (0/1 for qrels).
    b_mn: float [m, n] scores.
    margin: float >= 0.

  Returns:
    bool.
  """
  a_mn = np.asarray(a_mn, dtype=np.float64)
  if a_mn.ndim != 2 or a_mn.size == 0 or not np.isfinite(a_mn).all():
    raise ValueError(
        f"a_mn must be a non-empty finite 2-D array, got shape {a_mn.shape}")
  b_mn = _as_scores("b_mn", b_mn, a_mn.shape)
  margin = _check_margin(margin)
  # Row by row keeps memory at n^2 instead of m n^2.
  for a_n, b_n in zip(a_mn, b_mn):
    above_nn = a_n[:, None] > a_n[None, :]
    if not (b_n[:, None] - b_n[None, :] > margin)[above_nn].all():
      return False
  return True


# The chain as transforms of certificates.


def rop_to_rt(a_mn, b_mn) -> np.ndarray:
  """Per-row thresholds for an order-preserving B: rank_rt <= rank_rop.

  tau_i is the midpoint between row i's lowest relevant and highest
  irrelevant score, so both sides are strict. A row with no irrelevant
  document gets a threshold below all its scores, one with no relevant
  document a threshold above them.

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    b_mn: float [m, n] scores, row-wise order preserving for a_mn.

  Returns:
    tau_m: float64 [m] with B_ij > tau_i iff A_ij = 1 and B_ij != tau_i.

  Raises:
    ValueError: if B does not preserve A's order, or if a row's relevant and
      irrelevant scores are adjacent floats, so that no float64 lies
      strictly between them.
  """
  a_mn = _as_binary("a_mn", a_mn)
  b_mn = _as_scores("b_mn", b_mn, a_mn.shape)
  if not is_row_order_preserving(a_mn, b_mn):
    raise ValueError("b_mn does not preserve the order of a_mn in every row")
  relevant_mn = a_mn == 1
  low_m = np.where(relevant_mn, b_mn, np.inf).min(axis=1)
  high_m = np.where(relevant_mn, -np.inf, b_mn).max(axis=1)
  no_irrelevant_m = ~np.isfinite(high_m)
  no_relevant_m = ~np.isfinite(low_m)
  mixed_m = ~(no_irrelevant_m | no_relevant_m)
  tau_m = np.empty_like(low_m)
  # 0.5 low + 0.5 high cannot overflow, unlike (low + high) / 2.
  tau_m[mixed_m] = 0.5 * low_m[mixed_m] + 0.5 * high_m[mixed_m]
  # Rows with one kind of document only: step one unit (scaled, so it does
  # not vanish in rounding for large scores) past the extreme score.
  low_k = low_m[no_irrelevant_m]
  tau_m[no_irrelevant_m] = low_k - 1.0 - np.abs(low_k)
  high_k = high_m[no_relevant_m]
  tau_m[no_relevant_m] = high_k + 1.0 + np.abs(high_k)
  strict_m = (high_m < tau_m) & (tau_m < low_m)
  if not strict_m.all():
    row = int(np.flatnonzero(~strict_m)[0])
    raise ValueError(
        f"row {row} of b_mn separates relevant from irrelevant scores by "
        f"less than one float64 step ({high_m[row]!r} vs {low_m[row]!r})")
  return tau_m


def rt_to_sign(a_mn, b_mn, tau_m) -> np.ndarray:
  """Sign-pattern scores from a row-thresholded B: rank_pm <= rank_rt + 1.

  B' = B - tau 1^T = [U, -tau] [V, 1]^T, so rank(B') <= rank(B) + 1 and
  sign(B') = 2A - 1. The definition lets an irrelevant score equal its
  threshold; such rows first get the strict midpoint threshold of
  `rop_to_rt` so that no entry of B' is zero.

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    b_mn: float [m, n] scores.
    tau_m: float [m] thresholds with `is_row_thresholdable(a, b, tau)`.

  Returns:
    float64 [m, n] scores with `realizes_sign_pattern(2A - 1, .)`.
  """
  a_mn = _as_binary("a_mn", a_mn)
  b_mn = _as_scores("b_mn", b_mn, a_mn.shape)
  tau_m = _as_row_thresholds(tau_m, a_mn.shape[0])
  if not is_row_thresholdable(a_mn, b_mn, tau_m):
    raise ValueError("(b_mn, tau_m) does not threshold a_mn row by row")
  tied_m = (b_mn == tau_m[:, None]).any(axis=1)
  if tied_m.any():
    tau_m = np.where(tied_m, rop_to_rt(a_mn, b_mn), tau_m)
  return b_mn - tau_m[:, None]


def sign_to_gt(a_mn, b_mn) -> float:
  """The global threshold of a sign-pattern B: rank_gt <= rank_pm.

  If sign(B) = 2A - 1 then B_ij > 0 iff A_ij = 1, so tau = 0 works and B
  itself is the certificate.

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    b_mn: float [m, n] scores with sign(B) = 2A - 1.

  Returns:
    tau: 0.0.
  """
  a_mn = _as_binary("a_mn", a_mn)
  if not realizes_sign_pattern(2 * a_mn - 1, b_mn):
    raise ValueError("b_mn does not have the sign pattern 2 a_mn - 1")
  return 0.0


def gt_to_rt(a_mn, b_mn, tau: float) -> np.ndarray:
  """Per-row thresholds from a global one: rank_rt <= rank_gt.

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    b_mn: float [m, n] scores with `is_globally_thresholdable(a, b, tau)`.
    tau: float, the global threshold.

  Returns:
    tau_m: float64 [m], every entry tau.
  """
  a_mn = _as_binary("a_mn", a_mn)
  if not is_globally_thresholdable(a_mn, b_mn, tau):
    raise ValueError(f"(b_mn, tau={tau}) does not threshold a_mn globally")
  return np.full(a_mn.shape[0], float(tau))


# Realizations and the max-margin LP search.


@dataclasses.dataclass(frozen=True)
class Realization:
  """A candidate low-rank certificate B = U V^T with thresholds.

  Attributes:
    kind: "rt" (per-row thresholds; also a rop certificate), "gt" (one
      threshold, repeated in tau_m) or "sign" (thresholds zero).
    found: whether the certificate passes its exact checker with a margin
      above the search's `min_margin`; only then does it prove rank <= dim.
    u_md: float64 [m, d] query factors.
    v_nd: float64 [n, d] document factors.
    tau_m: float64 [m] thresholds.
    margin: min_ij (2A_ij - 1)(B_ij - tau_i), the certificate's worst
      signed gap; positive iff every entry is strictly on its side.
  """
  kind: str
  found: bool
  u_md: np.ndarray
  v_nd: np.ndarray
  tau_m: np.ndarray
  margin: float

  @property
  def dim(self) -> int:
    return self.u_md.shape[1]

  @property
  def scores_mn(self) -> np.ndarray:
    return self.u_md @ self.v_nd.T


def certifies(a_mn, realization: Realization, margin: float = 0.0) -> bool:
  """Whether a realization's scores and thresholds pass the exact checker.

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    realization: a `Realization` of any kind.
    margin: float >= 0, passed on to the checker.

  Returns:
    bool; True proves rank_<kind>(A) <= realization.dim.
  """
  a_mn = _as_binary("a_mn", a_mn)
  b_mn = realization.scores_mn
  tau_m = realization.tau_m
  if realization.kind == "rt":
    return is_row_thresholdable(a_mn, b_mn, tau_m, margin)
  if realization.kind == "gt":
    return bool((tau_m == tau_m[0]).all()) and is_globally_thresholdable(
        a_mn, b_mn, tau_m[0], margin)
  if realization.kind == "sign":
    return realizes_sign_pattern(2 * a_mn - 1, b_mn, margin)
  raise ValueError(f"realization.kind must be one of {KINDS}, got "
                   f"{realization.kind!r}")


def _check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  return kind


def _threshold_index(kind: str, m: int, n: int, queries: bool):
  """Which threshold variable each entry of an LP's rows uses.

  Returns (theta_rc, count): ints [r, c] indexing the threshold variables
  (rows are queries, or documents when queries=False), or (None, 0) for the
  sign kind, whose thresholds are zero.
  """
  shape = (m, n) if queries else (n, m)
  if kind == "sign":
    return None, 0
  if kind == "gt":
    return np.zeros(shape, int), 1
  query_index = np.arange(m)[:, None] if queries else np.arange(m)[None, :]
  return np.broadcast_to(query_index, shape), m


def _solve_rows(sign_rc, fixed_cd, theta_rc, num_theta: int, hinge: bool,
                shared_margin: bool = False):
  """One LP for the row factors X [r, d] given column factors F [c, d].

  Every entry asks s_rc (x_r . f_c - theta[theta_rc]) to be positive, with
  threshold variables theta shared as theta_rc says. Two objectives:

  * hinge=False, max-margin: maximise t subject to
    s_rc (x_r . f_c - theta) >= t_r, |x|_inf <= 1, t <= 1, with one t per
    row (objective sum_r t_r; rows that share no threshold decouple, so each
    gets its own best margin) or one shared t (max-min). The box loses
    nothing: a strict solution scales into it, and theta can be clamped to
    +-(1 + max_c |f_c|_1), beyond which it puts every score on one side. So
    for fixed F the optimum is positive iff some X and theta are strict.
  * hinge=True, soft margin: minimise sum_rc xi_rc subject to
    s_rc (x_r . f_c - theta) >= 1 - xi_rc, xi >= 0, x and theta free. Zero
    iff some X realises the pattern strictly (then scale it up), and, unlike
    the max-min margin, every violated entry pulls on the solution.

  Returns:
    (x_rd, theta) or None if the solver failed.
  """
  r, c = sign_rc.shape
  d = fixed_cd.shape[1]
  num_t = r * c if hinge else (1 if shared_margin else r)
  num_vars = r * d + num_theta + num_t
  entry_rc = np.arange(r * c).reshape(r, c)
  # Entry (r, c) is the inequality -s f_c . x_r + s theta -+ slack <= b.
  rows = [np.repeat(entry_rc.ravel(), d)]
  cols = [np.broadcast_to((np.arange(r) * d)[:, None, None]
                          + np.arange(d)[None, None, :], (r, c, d)).ravel()]
  vals = [(-sign_rc[:, :, None] * fixed_cd[None, :, :]).ravel()]
  if num_theta:
    rows.append(entry_rc.ravel())
    cols.append(r * d + theta_rc.ravel())
    vals.append(sign_rc.ravel())
  if hinge:
    slack_rc = entry_rc
  elif shared_margin:
    slack_rc = np.zeros((r, c), int)
  else:
    slack_rc = np.broadcast_to(np.arange(r)[:, None], (r, c))
  rows.append(entry_rc.ravel())
  cols.append(r * d + num_theta + slack_rc.ravel())
  vals.append(np.full(r * c, -1.0 if hinge else 1.0))
  a_ub = sparse.csr_matrix(
      (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
      shape=(r * c, num_vars))
  cost = np.zeros(num_vars)
  if hinge:
    b_ub = np.full(r * c, -1.0)
    bounds = [(None, None)] * (r * d + num_theta) + [(0.0, None)] * num_t
    cost[r * d + num_theta:] = 1.0
  else:
    b_ub = np.zeros(r * c)
    theta_box = 1.0 + np.abs(fixed_cd).sum(axis=1).max()
    bounds = ([(-1.0, 1.0)] * (r * d) + [(-theta_box, theta_box)] * num_theta
              + [(None, 1.0)] * num_t)
    cost[r * d + num_theta:] = -1.0
  result = optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds,
                            method="highs")
  if result.status != 0:
    return None
  return (result.x[:r * d].reshape(r, d),
          result.x[r * d:r * d + num_theta])


def _thresholds(kind: str, theta, m: int) -> np.ndarray:
  """Per-row thresholds tau_m from an LP's threshold variables."""
  if kind == "sign":
    return np.zeros(m)
  return np.full(m, theta[0]) if kind == "gt" else theta


def _realization(a_mn, kind, u_md, v_nd, tau_m, min_margin) -> Realization:
  """Packs factors into a Realization, measuring and checking the margin."""
  sign_mn = 2 * a_mn - 1
  margin = float(np.min(sign_mn * (u_md @ v_nd.T - tau_m[:, None])))
  realization = Realization(kind, False, u_md, v_nd, tau_m, margin)
  found = margin > min_margin and certifies(a_mn, realization, min_margin)
  return dataclasses.replace(realization, found=bool(found))


def _max_margin_queries(a_mn, v_nd, kind, min_margin) -> Realization:
  m, n = a_mn.shape
  theta_mn, num_theta = _threshold_index(kind, m, n, queries=True)
  fit = _solve_rows(2 * a_mn - 1, v_nd, theta_mn, num_theta, hinge=False,
                    shared_margin=kind == "gt")
  if fit is None:
    raise RuntimeError("the LP solver failed on a feasible, bounded LP")
  u_md, theta = fit
  return _realization(a_mn, kind, u_md, v_nd, _thresholds(kind, theta, m),
                      min_margin)


def realize_with_docs(a_mn, v_nd, kind: str = "rt",
                      min_margin: float = 1e-9) -> Realization:
  """Best query factors for fixed documents: an exact feasibility test.

  Solves the max-margin LP over U (and tau for rt/gt): maximise t subject
  to (2A_ij - 1)(u_i . v_j - tau_i) >= t, |U|_inf <= 1, t <= 1 (one t per
  row, shared for gt). Some U and thresholds realise A with these documents
  iff the optimal margin is positive, so `found` decides realisability
  with V, up to the margin floor `min_margin` (the LP solver's tolerance
  is covered by re-measuring the margin and the exact checker).

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    v_nd: float [n, d] document embeddings.
    kind: "rt", "gt" or "sign".
    min_margin: float >= 0; a certificate counts only above this margin,
      which keeps it clear of float rounding in U V^T.

  Returns:
    Realization with v_nd as given.
  """
  a_mn = _as_binary("a_mn", a_mn)
  kind = _check_kind(kind)
  v_nd = np.asarray(v_nd, dtype=np.float64)
  if v_nd.ndim != 2 or v_nd.shape[0] != a_mn.shape[1] or v_nd.shape[1] < 1:
    raise ValueError(
        f"v_nd must have shape [{a_mn.shape[1]}, d >= 1], got {v_nd.shape}")
  if not np.isfinite(v_nd).all():
    raise ValueError("v_nd must be finite")
  return _max_margin_queries(a_mn, v_nd, kind, _check_margin(min_margin))


def _unit_box(x) -> np.ndarray:
  """Scales x to max |entry| = 1; the next LP re-solves the other factor."""
  scale = np.abs(x).max()
  return x / scale if scale > 0 else x


def _smooth_fit(sign_mn, v_nd, kind: str, rng, sharpness: float,
                l2: float, max_iter: int) -> np.ndarray:
  """Joint L-BFGS fit of U, V and the thresholds to a logistic loss.

  Minimises sum_ij softplus(-sharpness g_ij) + l2 (|U|^2 + |V|^2) with
  g_ij = (2A_ij - 1)(u_i . v_j - tau_i), from the given V and a small
  random U. Moving all factors at once avoids the degenerate vertices that
  stall LP alternation; the ridge term keeps the scale from running off.

  Returns:
    v_nd: float64 [n, d], the fitted documents.
  """
  m, n = sign_mn.shape
  d = v_nd.shape[1]
  num_theta = {"rt": m, "gt": 1, "sign": 0}[kind]

  def loss_and_grad(x):
    u_md = x[:m * d].reshape(m, d)
    v_nd = x[m * d:(m + n) * d].reshape(n, d)
    tau_m = _thresholds(kind, x[(m + n) * d:], m)
    z_mn = -sharpness * sign_mn * (u_md @ v_nd.T - tau_m[:, None])
    loss = (np.logaddexp(0.0, z_mn).sum()
            + l2 * ((u_md**2).sum() + (v_nd**2).sum()))
    # d loss / d B; expit keeps the logistic derivative free of overflow.
    w_mn = -sharpness * sign_mn * special.expit(z_mn)
    grad_tau_m = -w_mn.sum(axis=1)
    grad_theta = (grad_tau_m if kind == "rt" else grad_tau_m.sum(keepdims=True)
                  if kind == "gt" else np.zeros(0))
    grad = np.concatenate([(w_mn @ v_nd + 2 * l2 * u_md).ravel(),
                           (w_mn.T @ u_md + 2 * l2 * v_nd).ravel(),
                           grad_theta])
    return loss, grad

  x0 = np.concatenate([rng.normal(0.0, d**-0.5, m * d), v_nd.ravel(),
                       np.zeros(num_theta)])
  result = optimize.minimize(loss_and_grad, x0, jac=True, method="L-BFGS-B",
                             options={"maxiter": max_iter})
  return result.x[m * d:(m + n) * d].reshape(n, d)


def search_realization(a_mn, dim: int, kind: str = "rt", *, seed: int = 0,
                       restarts: int = 8, rounds: int = 5,
                       smooth_iters: int = 500,
                       min_margin: float = 1e-9) -> Realization:
  """Searches for a rank-`dim` certificate; a found one proves rank <= dim.

  Each restart draws documents uniformly on the unit sphere (every point is
  then a vertex of their hull, so any single document can top a query),
  fits U, V and the thresholds jointly by L-BFGS on a logistic loss, and
  then alternates linear programs. Each round first solves the exact
  max-margin LP for U (and thresholds) with V fixed (`realize_with_docs`)
  and returns its certificate if it passes the exact checker with margin
  > min_margin; otherwise it takes one soft-margin (hinge) LP step for U
  and then one for V and the thresholds with U fixed (see `_solve_rows`).
  The hinge steps minimise one total loss block by block, so it never
  increases. LP alternation alone stalls at degenerate vertices (a query
  whose document cannot be separated gets u_i = 0 and exerts no pull on
  the documents), which is what the joint smooth fit is for.

  The search is local: a miss proves nothing. Only found certificates are
  evidence (rank_<kind>(A) <= dim, and rank_rop = rank_rt).

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    dim: int >= 1, the rank to try.
    kind: "rt" (= rop), "gt" or "sign" (pattern 2A - 1).
    seed: int, seeds np.random.default_rng for the restarts.
    restarts: int >= 1.
    rounds: int >= 1, LP rounds per restart.
    smooth_iters: int >= 0, L-BFGS iterations per restart (0 skips the
      smooth fit and leaves pure LP alternation).
    min_margin: float >= 0, the margin (with |U|_inf <= 1 and documents
      scaled to |V|_inf = 1) a certificate must beat.

  Returns:
    Realization: the first found certificate; else the max-margin LP fit of
    the documents that came closest (found=False).
  """
  a_mn = _as_binary("a_mn", a_mn)
  kind = _check_kind(kind)
  for name, value, least in (("dim", dim, 1), ("restarts", restarts, 1),
                             ("rounds", rounds, 1),
                             ("smooth_iters", smooth_iters, 0)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < least):
      raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
  min_margin = _check_margin(min_margin)
  m, n = a_mn.shape
  sign_mn = 2 * a_mn - 1
  theta_mn, num_theta = _threshold_index(kind, m, n, queries=True)
  theta_nm, _ = _threshold_index(kind, m, n, queries=False)
  rng = np.random.default_rng(seed)
  best = None
  for _ in range(restarts):
    v_nd = rng.standard_normal((n, dim))
    v_nd /= np.linalg.norm(v_nd, axis=1, keepdims=True)
    if smooth_iters:
      # Sharpness 8 and ridge 1e-3 ask for gaps of a few 1/8 at unit scale.
      v_nd = _smooth_fit(sign_mn, v_nd, kind, rng, sharpness=8.0, l2=1e-3,
                         max_iter=smooth_iters)
    for _ in range(rounds):
      v_nd = _unit_box(v_nd)
      current = _max_margin_queries(a_mn, v_nd, kind, min_margin)
      if current.found:
        return current
      if best is None or current.margin > best.margin:
        best = current
      fit = _solve_rows(sign_mn, v_nd, theta_mn, num_theta, hinge=True)
      if fit is None:
        break
      fit = _solve_rows(sign_mn.T, _unit_box(fit[0]), theta_nm, num_theta,
                        hinge=True)
      if fit is None:
        break
      v_nd = fit[0]
  return best


# Exact and lower-bound tools.


def integer_rank(a_mn) -> int:
  """The exact rank over the rationals of an integer matrix.

  Fraction-free Gaussian elimination on Python ints, each new row divided
  by the gcd of its entries to keep the numbers small. Exact, unlike an SVD
  threshold, so it can back a proof.

  Args:
    a_mn: [m, n] integer-valued array (0/1 qrels, +-1 patterns).

  Returns:
    int, rank(A).
  """
  a_mn = np.asarray(a_mn)
  if a_mn.ndim != 2:
    raise ValueError(f"a_mn must be 2-D, got shape {a_mn.shape}")
  if not np.array_equal(a_mn, np.round(a_mn)):
    raise ValueError("a_mn must be integer-valued")
  rows = [[int(x) for x in row] for row in a_mn]
  rank = 0
  for col in range(a_mn.shape[1]):
    pivot = next((r for r in range(rank, len(rows)) if rows[r][col]), None)
    if pivot is None:
      continue
    rows[rank], rows[pivot] = rows[pivot], rows[rank]
    p = rows[rank]
    for r in range(rank + 1, len(rows)):
      f = rows[r][col]
      if f:
        new = [p[col] * x - f * y for x, y in zip(rows[r], p)]
        g = math.gcd(*new)
        rows[r] = [x // g for x in new] if g > 1 else new
    rank += 1
  return rank


def forster_bound(sign_mn) -> float:
  """Forster's lower bound sqrt(m n) / ||M||_2 on the sign rank of M.

  Args:
    sign_mn: [m, n] matrix of -1 / +1.

  Returns:
    float; rank_pm(M) >= this value (up to float rounding in the norm).
  """
  sign_mn = _as_sign("sign_mn", sign_mn)
  m, n = sign_mn.shape
  return math.sqrt(m * n) / float(np.linalg.norm(sign_mn, 2))


def is_sign_rank_one(sign_mn) -> bool:
  """Whether rank_pm(M) = 1, i.e. all rows of M are equal up to sign.

  A rank-1 B = u v^T with no zero entry has sign(B_ij) = sign(u_i) sign(v_j),
  an outer product of sign vectors; conversely x y^T realises itself.

  Args:
    sign_mn: [m, n] matrix of -1 / +1.

  Returns:
    bool.
  """
  sign_mn = _as_sign("sign_mn", sign_mn)
  aligned_mn = sign_mn * sign_mn[:, :1]
  return bool((aligned_mn == aligned_mn[:1]).all())


def sign_rank_lower_bound(sign_mn) -> int:
  """A proven lower bound on rank_pm(M): Forster's bound and the rank-1 test.

  Args:
    sign_mn: [m, n] matrix of -1 / +1.

  Returns:
    int >= 1.
  """
  sign_mn = _as_sign("sign_mn", sign_mn)
  forster = forster_bound(sign_mn) * (1.0 - _FORSTER_RELATIVE_SLACK)
  return max(1, math.ceil(forster), 1 if is_sign_rank_one(sign_mn) else 2)


def rank_one_row_threshold(a_mn) -> Realization:
  """Decides rank_rt(A) <= 1 exactly, with a certificate when it holds.

  Criterion. rank_rt(A) <= 1 iff some linear order of the documents makes
  every row's relevant set S_i a prefix or a suffix. (=>) With B = u v^T,
  row i's relevant set {j : u_i v_j > tau_i} is an up-set of v if u_i > 0,
  a down-set if u_i < 0 and all or nothing if u_i = 0. (<=) v_j = position
  and u_i = +-1 realise it.

  Decision. If such an order exists, let f be its first document and
  T_i = S_i when f is in S_i, else the complement. Every T_i is then a
  prefix, so the T_i form a chain under inclusion. Conversely, if for some
  f the sets T_i form a chain, put v_j = #{i : j in T_i}: every j in T_i
  and k outside have v_j > v_k (a chain member holding k but not j could be
  neither inside nor around T_i), so T_i and its complement are an up-set
  and a down-set of v, and u_i = +1 if T_i = S_i else -1 orders row i.
  Trying all n choices of f costs O(n m (n + log m)).

  Args:
    a_mn: [m, n] 0/1 qrel matrix.

  Returns:
    Realization of kind "rt" and dim 1; found is True iff rank_rt(A) <= 1
    (it is 0 iff every row is all-0 or all-1), with integer factors and
    half-integer thresholds, so the certificate is exact in float64.
  """
  a_mn = _as_binary("a_mn", a_mn)
  m, n = a_mn.shape
  for f in range(n):
    # T_i: the version of S_i holding document f.
    t_mn = np.where(a_mn[:, f:f + 1] == 1, a_mn, 1 - a_mn)
    chain_mn = t_mn[np.argsort(t_mn.sum(axis=1), kind="stable")]
    if (chain_mn[:-1] <= chain_mn[1:]).all():
      v_n1 = t_mn.sum(axis=0)[:, None]
      u_m1 = np.where(a_mn[:, f] == 1, 1.0, -1.0)[:, None]
      tau_m = rop_to_rt(a_mn, u_m1 @ v_n1.T)
      return _realization(a_mn, "rt", u_m1, v_n1, tau_m, 0.0)
  return Realization("rt", False, np.zeros((m, 1)), np.zeros((n, 1)),
                     np.zeros(m), -math.inf)


def rank_two_sign(sign_mn, max_side: int = 10) -> Realization | None:
  """Decides rank_pm(M) <= 2 exactly for small M, with a certificate.

  Criterion. In the plane, sign(u_i . v_j) is unchanged when v_j is scaled
  by a positive number, so let every document sit on the unit circle, and
  negate some columns (c_j = -1) to bring all of them into the open upper
  half-plane at angles phi_j in (0, pi). Along that half-circle,
  u_i . v = |u_i| sin(phi - beta_i) changes sign once, at beta_i. So
  rank_pm(M) <= 2 iff for some column signs c the 0/1 matrix of
  M diag(c) > 0 has every row's positive set a prefix or a suffix of one
  order, i.e. has row-thresholdable rank <= 1 (`rank_one_row_threshold`).
  Negating all columns complements every row, which keeps that property,
  so one sign is fixed and 2^(k - 1) sign vectors are tried, k the smaller
  side (the sign rank of M^T is that of M).

  Certificate. With integer positions p_j from the rank-1 certificate and
  P = max p, phi_j = pi (p_j + 1) / (P + 2) and each row's threshold t_i
  maps to beta_i = pi (t_i + 1) / (P + 2); then
  u_i = +-(-sin beta_i, cos beta_i) and v_j = c_j (cos phi_j, sin phi_j).

  Args:
    sign_mn: [m, n] matrix of -1 / +1.
    max_side: int; when min(m, n) exceeds it the search (exponential in
      min(m, n)) is not attempted.

  Returns:
    Realization of kind "sign" and dim 2 (found iff rank_pm(M) <= 2), or
    None if min(m, n) > max_side.
  """
  sign_mn = _as_sign("sign_mn", sign_mn)
  transpose = sign_mn.shape[1] > sign_mn.shape[0]
  work_rc = sign_mn.T if transpose else sign_mn
  r, k = work_rc.shape
  if k > max_side:
    return None
  for bits in range(2 ** (k - 1)):
    # The last column keeps its sign: bit k - 1 of `bits` is always 0.
    c_k = 1 - 2 * ((bits >> np.arange(k)) & 1)
    one = rank_one_row_threshold((work_rc * c_k + 1) / 2)
    if not one.found:
      continue
    p_k = one.v_nd[:, 0]
    # Row i keeps the documents with p_j > t_i (u = +1) or p_j < t_i
    # (u = -1); clamping t_i to [-1/2, P + 1/2] keeps those sets and puts
    # beta_i strictly inside (0, pi), so phi - beta lies in (-pi, pi).
    dir_r = one.u_md[:, 0]
    top = p_k.max()
    t_r = np.clip(dir_r * one.tau_m, -0.5, top + 0.5)
    phi_k = np.pi * (p_k + 1) / (top + 2)
    beta_r = np.pi * (t_r + 1) / (top + 2)
    x_r2 = dir_r[:, None] * np.stack([-np.sin(beta_r), np.cos(beta_r)], 1)
    y_k2 = c_k[:, None] * np.stack([np.cos(phi_k), np.sin(phi_k)], 1)
    u_m2, v_n2 = (y_k2, x_r2) if transpose else (x_r2, y_k2)
    return _realization((sign_mn + 1) / 2, "sign", u_m2, v_n2,
                        np.zeros(sign_mn.shape[0]), 0.0)
  m, n = sign_mn.shape
  return Realization("sign", False, np.zeros((m, 2)), np.zeros((n, 2)),
                     np.zeros(m), -math.inf)


# Bounds for all three ranks.


@dataclasses.dataclass
class RankBounds:
  """Proven intervals for rank_rt (= rank_rop), rank_gt and rank_pm(2A - 1).

  Attributes:
    a_mn: float64 [m, n], the qrel matrix.
    rt_lower, rt_upper: int bounds on rank_rt(A) = rank_rop(A).
    gt_lower, gt_upper: int bounds on rank_gt(A).
    sign_lower, sign_upper: int bounds on rank_pm(2A - 1).
    certificates: kind -> the found Realization behind a searched upper
      bound (bounds from rank(A), min(m, n) or the chain need none).
  """
  a_mn: np.ndarray
  rt_lower: int
  rt_upper: int
  gt_lower: int
  gt_upper: int
  sign_lower: int
  sign_upper: int
  certificates: dict[str, Realization] = dataclasses.field(
      default_factory=dict)

  def interval(self, kind: str) -> tuple[int, int]:
    kind = _check_kind(kind)
    return getattr(self, f"{kind}_lower"), getattr(self, f"{kind}_upper")

  def _ends(self) -> tuple[int, ...]:
    return (self.rt_lower, self.rt_upper, self.gt_lower, self.gt_upper,
            self.sign_lower, self.sign_upper)

  def tighten(self) -> None:
    """Propagates the chain through the bounds until nothing changes."""
    while True:
      before = self._ends()
      self.rt_lower = max(self.rt_lower, self.sign_lower - 1)
      self.gt_lower = max(self.gt_lower, self.rt_lower)
      self.sign_lower = max(self.sign_lower, self.gt_lower)
      self.sign_upper = min(self.sign_upper, self.rt_upper + 1)
      self.gt_upper = min(self.gt_upper, self.sign_upper)
      self.rt_upper = min(self.rt_upper, self.gt_upper)
      if self._ends() == before:
        return

  def check_chain(self) -> None:
    """Raises AssertionError unless the bounds fit the chain and proofs.

    Checks that each interval is non-empty, that some ranks (r, g, s) in
    the intervals satisfy s - 1 <= r <= g <= s, and that every stored
    certificate passes its exact checker and has dim >= its upper bound.
    """
    r_lo, r_hi = self.interval("rt")
    g_lo, g_hi = self.interval("gt")
    s_lo, s_hi = self.interval("sign")
    if not (0 <= r_lo <= r_hi and 0 <= g_lo <= g_hi and 1 <= s_lo <= s_hi):
      raise AssertionError(f"empty or invalid interval in {self}")
    consistent = any(
        s - 1 <= r <= g <= s
        for r in range(r_lo, r_hi + 1) for g in range(g_lo, g_hi + 1)
        for s in range(s_lo, s_hi + 1))
    if not consistent:
      raise AssertionError(f"no ranks in these intervals fit the chain: "
                           f"rt {r_lo, r_hi}, gt {g_lo, g_hi}, "
                           f"sign {s_lo, s_hi}")
    for kind, realization in self.certificates.items():
      if realization.kind != kind or not certifies(self.a_mn, realization):
        raise AssertionError(f"the {kind} certificate does not verify")
      if realization.dim < self.interval(kind)[1]:
        raise AssertionError(
            f"the {kind} certificate has dim {realization.dim} below the "
            f"stored upper bound {self.interval(kind)[1]}")


def rank_bounds(a_mn, max_dim: int | None = None, seed: int = 0, *,
                restarts: int = 8, rounds: int = 5,
                max_side: int = 10) -> RankBounds:
  """Proven lower and upper bounds on rank_rt, rank_gt and rank_pm(2A - 1).

  Lower bounds: rank_rt = 0 iff every row is constant (B = 0 with tau_i =
  -1 or 0) and rank_gt = 0 iff A is constant; the exact rank-1 tests for
  rt and sign; the exact rank-2 test for sign when min(m, n) <= max_side;
  Forster's bound on rank_pm(2A - 1); then the chain.

  Upper bounds without search: rank_gt <= rank(A) (B = A, tau = 1/2);
  rank_rt <= rank of A with its constant rows zeroed (such a row needs no
  direction, only tau_i); rank_pm <= min(m, n) (B = 2A - 1 itself); the
  rank-1 and sign rank-2 certificates; then the chain (rank_pm <=
  rank_rt + 1, so rank_pm <= rank(A) + 1 via B = A - 1/2). Ranks are
  computed exactly (`integer_rank`).

  Then, for rt, gt and sign in turn, `search_realization` tries each d
  from the current lower bound up to min(upper - 1, max_dim); the first
  found certificate sets the upper bound and is stored. Misses never move
  a lower bound.

  Args:
    a_mn: [m, n] 0/1 qrel matrix.
    max_dim: int, the largest d searched (None: no limit but the bounds).
    seed: int, seeds every search.
    restarts: int, restarts per search.
    rounds: int, LP rounds per restart.
    max_side: int, the largest min(m, n) for the exhaustive sign-rank-2
      test (`rank_two_sign`, 2^(min(m, n) - 1) cases).

  Returns:
    RankBounds, already passing `check_chain`.
  """
  a_mn = _as_binary("a_mn", a_mn)
  m, n = a_mn.shape
  sign_mn = 2 * a_mn - 1
  constant_row_m = (a_mn == a_mn[:, :1]).all(axis=1)
  rank_one_rt = rank_one_row_threshold(a_mn)
  bounds = RankBounds(
      a_mn=a_mn,
      rt_lower=0 if constant_row_m.all() else 1 if rank_one_rt.found else 2,
      rt_upper=integer_rank(np.where(constant_row_m[:, None], 0, a_mn)),
      gt_lower=0 if (a_mn == a_mn[0, 0]).all() else 1,
      gt_upper=0 if (a_mn == a_mn[0, 0]).all() else integer_rank(a_mn),
      sign_lower=sign_rank_lower_bound(sign_mn),
      sign_upper=1 if is_sign_rank_one(sign_mn) else min(m, n))
  if rank_one_rt.found and bounds.rt_upper >= 1:
    bounds.rt_upper = 1
    bounds.certificates["rt"] = rank_one_rt
  if bounds.sign_lower <= 2 < bounds.sign_upper:
    rank_two = rank_two_sign(sign_mn, max_side)
    if rank_two is not None and rank_two.found:
      bounds.sign_upper = 2
      bounds.certificates["sign"] = rank_two
    elif rank_two is not None:
      bounds.sign_lower = 3
  bounds.tighten()
  for kind in KINDS:
    lower, upper = bounds.interval(kind)
    last = upper - 1 if max_dim is None else min(upper - 1, max_dim)
    for dim in range(max(lower, 1), last + 1):
      realization = search_realization(a_mn, dim, kind, seed=seed,
                                       restarts=restarts, rounds=rounds)
      if realization.found:
        setattr(bounds, f"{kind}_upper", dim)
        bounds.certificates[kind] = realization
        bounds.tighten()
        break
  bounds.check_chain()
  return bounds
