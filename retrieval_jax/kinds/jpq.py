"""JPQ: a query encoder trained against fixed PQ codes (Zhan et al. 2021).

At the start of a run the training corpus is embedded by the starting
encoder (or read from `config.model.jpq_init`, an encode-mode .npy) and
product-quantised by faiss (M = `jpq_subspaces`, 2^`jpq_nbits` centroids
each). The codes [N, M] are constants of the run, kept in `state["extra"]`
with the centroids and checkpointed. Trained: the query encoder and the
centroids (`models.jpq`: init + scale · offset). A passage is its code
decoded with the current centroids, scored by ADC under any `losses.LOSSES`
objective; no document tower runs in training (in-batch and hard
negatives, not the paper's top-200 ΔRR-weighted loss). Domain adaptation
adds margin-MSE against the frozen starting encoder (`frozen_teacher`).
`build_index`: a faiss IndexPQ of the trained centroids and the codes.
"""

import functools
import json
import math
import pathlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import checkpointing
from retrieval_jax import encoding
from retrieval_jax import pretrained
from retrieval_jax import train_state
from retrieval_jax.data import beir
from retrieval_jax.errors import ConfigError
from retrieval_jax.kinds import base
from retrieval_jax.kinds import bi_encoder
from retrieval_jax.kinds import frozen_teacher
from retrieval_jax.models import jpq as jpq_model
from retrieval_jax.search import compression
from retrieval_jax.search import product_quantization

CODES = "codes_nm"  # int32 [N, M]: each corpus document's centroid ids
CENTROIDS = "centroids_init_mks"  # float32 [M, K, S]: k-means centroids


def adc_candidate_scores(
    q_bd: jax.Array, centroids_mks: jax.Array, codes_cm: jax.Array
) -> jax.Array:
  """float32 [B, C] ADC scores of queries against C codes.

  Σ_m ⟨q_m, centroid[m, code_cm]⟩ = ⟨q, decode(code_c)⟩, by lookup tables
  (`product_quantization.adc_tables` / `adc_scores`, the index's own
  search); differentiable in q and the centroids.
  """
  tables_bmk = product_quantization.adc_tables(q_bd, centroids_mks)
  return product_quantization.adc_scores(tables_bmk, codes_cm)


def init_extra(
    model_def, params, *, centroids_mks, codes_nm, teacher: bool
) -> dict:
  """The run's constants: codes and k-means centroids (+ the teacher)."""
  extra = {
      CODES: jnp.asarray(codes_nm, jnp.int32),
      CENTROIDS: jnp.asarray(centroids_mks, jnp.float32),
  }
  if teacher:
    extra.update(frozen_teacher.init_extra(model_def, params))
  return extra


def loss(
    model,
    batch,
    rng,
    step,
    extra,
    *,
    loss_fn,
    temperature: float,
    pooling: str,
    normalize: bool,
    share_hard_negatives: bool,
    ranking_weight: float,
    margin_mse_weight: float,
    teacher_scale: float,
):
  """`(loss, (aux, extra))` of one batch (`base.TrainSpec` with extra).

  Batch: query_ids / query_mask [B, Lq], positive_counts [B], passage_doc
  [B*G] (corpus rows: codes; -1 padding), relevant_doc [B, R];
  passage_ids / passage_mask only for the teacher.
  """
  del step
  q_rng, _ = base.split_rng(rng)
  q_bd = bi_encoder.encode(
      model.encoder,
      batch["query_ids"],
      batch["query_mask"],
      q_rng,
      pooling=pooling,
      normalize=normalize,
  )
  doc_c = batch["passage_doc"]
  # Padding rows (-1) read row 0; `in_batch_loss` masks them.
  codes_cm = extra[CODES][jnp.maximum(doc_c, 0)]
  scores_qc = adc_candidate_scores(
      q_bd, model.centroids(extra[CENTROIDS]), codes_cm
  )
  ranking, aux = base.in_batch_loss(
      scores_qc / temperature,
      batch,
      loss_fn=loss_fn,
      share_hard_negatives=share_hard_negatives,
  )
  aux = dict(aux, ranking_loss=ranking)
  value = ranking_weight * ranking
  if margin_mse_weight:
    teacher_bg = frozen_teacher.teacher_scores(
        model, extra, batch, pooling=pooling, normalize=normalize
    )
    mse, _ = frozen_teacher.margin_mse(
        frozen_teacher.own_groups(scores_qc),
        teacher_bg,
        doc_c,
        teacher_scale=teacher_scale,
    )
    aux["margin_mse"] = mse
    value = value + margin_mse_weight * mse
  return value, (aux, extra)


def corpus_codebooks(
    docs_nd: np.ndarray, *, subspaces: int, nbits: int
) -> tuple[np.ndarray, np.ndarray]:
  """faiss PQ of [N, D] documents: (centroids_mks float32, codes_nm int32).

  `compression.build("pq")` (faiss IndexPQ, k-means per sub-space), read
  back with `product_quantization.faiss_pq_arrays`.
  """
  index = compression.build(
      "pq", docs_nd, metric="dot", m=subspaces, nbits=nbits
  )
  centroids_mks, codes_nm = product_quantization.faiss_pq_arrays(
      index.faiss_index()
  )
  return centroids_mks.astype(np.float32), codes_nm.astype(np.int32)


def _packed_codes(codes_nm: np.ndarray, nbits: int, code_size: int):
  """[N, M] ids -> [N, code_size] uint8, faiss' layout (low bit first)."""
  bits_nmb = (codes_nm[:, :, None] >> np.arange(nbits)) & 1
  bits_nx = bits_nmb.reshape(len(codes_nm), -1).astype(np.uint8)
  packed_nb = np.packbits(bits_nx, axis=1, bitorder="little")
  return np.ascontiguousarray(packed_nb[:, :code_size])


def pq_index(
    centroids_mks,
    *,
    codes_nm=None,
    docs_nd=None,
    engine: str = "faiss",
) -> compression.Index:
  """A `compression` "pq" index over given centroids (inner product).

  Exactly one of codes_nm (int [N, M], kept as they are) and docs_nd
  (float [N, M·S], each sub-vector assigned its nearest centroid by faiss).
  engine: "faiss" or "jax" ADC, as `compression.PqIndex`.
  """
  import faiss  # pylint: disable=g-import-not-at-top

  if (codes_nm is None) == (docs_nd is None):
    raise ValueError("pass exactly one of codes_nm and docs_nd")
  centroids_mks = np.asarray(centroids_mks, np.float32)
  m, k, s = centroids_mks.shape
  nbits = int(round(math.log2(k)))
  if 1 << nbits != k:
    raise ValueError(f"{k} centroids per sub-space is not a power of 2")
  index = faiss.IndexPQ(m * s, m, nbits, faiss.METRIC_INNER_PRODUCT)
  faiss.copy_array_to_vector(centroids_mks.ravel(), index.pq.centroids)
  index.is_trained = True
  if docs_nd is not None:
    index.add(np.ascontiguousarray(docs_nd, np.float32))
  else:
    codes_nm = np.asarray(codes_nm)
    if codes_nm.ndim != 2 or codes_nm.shape[1] != m:
      raise ValueError(f"codes must be [N, {m}], got {codes_nm.shape}")
    if codes_nm.min() < 0 or codes_nm.max() >= k:
      raise ValueError(f"codes must be in [0, {k})")
    index.add_sa_codes(
        _packed_codes(codes_nm.astype(np.int64), nbits, index.code_size)
    )
  config = dict(
      compression.PqIndex.defaults,
      m=m,
      nbits=nbits,
      engine=engine,
      kind=compression.PqIndex.kind,
      metric="dot",
      dim=m * s,
      num_docs=int(index.ntotal),
  )
  return compression.PqIndex(
      {"faiss_bytes": faiss.serialize_index(index)}, config
  )


def read_run_constants(run_dir) -> dict[str, np.ndarray]:
  """{CODES, CENTROIDS} of a jpq run's checkpoints (read-only, any step:
  they never change)."""
  directory = pathlib.Path(run_dir) / "checkpoints"
  manager = checkpointing.open_read_only(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory} holds no checkpoint")
    saved = manager.item_metadata(step).get(checkpointing.STATE)
    extra = saved.tree.get("extra", {}) if saved is not None else {}
    if CODES not in extra or CENTROIDS not in extra:
      raise ValueError(
          f"{directory}/{step}: no JPQ codes in the state (not a jpq run?)"
      )
  finally:
    manager.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {
      key: jax.ShapeDtypeStruct(
          tuple(extra[key].shape), extra[key].dtype, sharding=device
      )
      for key in (CODES, CENTROIDS)
  }
  restored = checkpointing.restore_params_from(
      directory, abstract, params_key="extra"
  )
  return {k: np.asarray(jax.device_get(v)) for k, v in restored.items()}


def _corpus_dir(config) -> str:
  return config.data.corpus_path or config.data.path


class Jpq(bi_encoder.BiEncoder):
  """See the module docstring."""

  name = "jpq"
  model_keys = (
      "jpq_subspaces",
      "jpq_nbits",
      "jpq_centroid_lr_scale",
      "jpq_init",
  )
  architectures = ("bert",)
  trains_with_evals = False

  def validate(self, config) -> None:
    super().validate(config)
    model = config.model
    for key, lo, hi in (("jpq_subspaces", 1, 4096), ("jpq_nbits", 1, 16)):
      value = model[key]
      if (
          isinstance(value, bool)
          or not isinstance(value, int)
          or not (lo <= value <= hi)
      ):
        raise ConfigError(
            f"config.model.{key}={value!r}: expected an integer in [{lo}, {hi}]"
        )
    scale = model.jpq_centroid_lr_scale
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or (scale <= 0)
    ):
      raise ConfigError(
          f"config.model.jpq_centroid_lr_scale={scale!r}: expected > 0"
      )
    if model.jpq_init:
      path = pathlib.Path(model.jpq_init)
      if not path.is_file() or not (path.parent / "corpus_ids.json").is_file():
        raise ConfigError(
            f"config.model.jpq_init={model.jpq_init!r}: expected the encode "
            "mode's corpus_embeddings.npy with corpus_ids.json beside it"
        )
    if config.data.format not in ("beir", "pairs"):
      raise ConfigError(
          f"config.data.format={config.data.format!r}: JPQ's codes index "
          "the training collection's corpus; use 'beir' or 'pairs'"
      )
    if config.checkpoint.init_from:
      # The codes and the teacher come from config.model.pretrained.
      raise ConfigError(
          "config.checkpoint.init_from: a jpq run starts from "
          "config.model.pretrained, whose corpus vectors its codes are"
      )
    ranking_weight, mse_weight, _ = frozen_teacher.check_settings(config, self)
    if not ranking_weight and not mse_weight:
      raise ConfigError(
          "config.loss.ranking_weight and margin_mse_weight are both 0: "
          "nothing to train"
      )

  def build(self, model_cfg, loaded, tokenizer, *, seed: int = 0):
    del tokenizer, seed
    dim = loaded.config.hidden_size
    m = model_cfg.jpq_subspaces
    if dim % m:
      raise ConfigError(
          f"config.model.jpq_subspaces={m} must divide the encoder's {dim} "
          "dimensions"
      )
    return jpq_model.JpqQueryEncoder(
        loaded.model,
        num_subspaces=m,
        num_centroids=1 << model_cfg.jpq_nbits,
        sub_dim=dim // m,
        centroid_scale=model_cfg.jpq_centroid_lr_scale,
    )

  def starting_codebooks(self, config, doc_ids, doc_texts, tokenizer, mesh):
    """(centroids_mks, codes_nm) of the corpus under the starting encoder.

    doc_ids / doc_texts: the training collection's corpus, in the loader's
    row order (`passage_doc`).
    """
    start = time.perf_counter()
    model = config.model
    if model.jpq_init:
      path = pathlib.Path(model.jpq_init)
      ids = json.loads((path.parent / "corpus_ids.json").read_text())
      if list(ids) != list(doc_ids):
        raise ConfigError(
            f"config.model.jpq_init={model.jpq_init!r}: its corpus_ids.json "
            f"does not list the {len(doc_ids)} documents of "
            f"{_corpus_dir(config)} in corpus order"
        )
      docs_nd = np.load(path)
    else:
      loaded = pretrained.load_model(model, dtype=jnp.dtype(model.dtype))
      encoder = encoding.TextEncoder(
          loaded.model,
          tokenizer,
          mesh,
          pooling=model.pooling,
          normalize=model.normalize,
          max_length=model.max_length,
      )
      with jax.default_matmul_precision(model.matmul_precision):
        docs_nd = encoder.encode(list(doc_texts), desc="jpq: corpus")
    if len(docs_nd) < 1 << model.jpq_nbits:
      raise ConfigError(
          f"config.model.jpq_nbits={model.jpq_nbits}: k-means of "
          f"{1 << model.jpq_nbits} centroids needs at least that many "
          f"documents; the corpus has {len(docs_nd)}"
      )
    centroids_mks, codes_nm = corpus_codebooks(
        docs_nd, subspaces=model.jpq_subspaces, nbits=model.jpq_nbits
    )
    logging.info(
        "jpq: %d docs -> %d x %d-bit codes in %.1f s",
        len(docs_nd),
        model.jpq_subspaces,
        model.jpq_nbits,
        time.perf_counter() - start,
    )
    return centroids_mks, codes_nm

  def train_spec(self, config, *, loader, tokenizer, loss_spec, mesh):
    ranking_weight, mse_weight, scale = frozen_teacher.check_settings(
        config, self
    )
    # The corpus as the collection has it (a pairs file may carry other
    # texts for its positives); rows as the loader's `passage_doc`.
    doc_ids, titles, texts = beir.read_corpus(
        beir.corpus_path(_corpus_dir(config))
    )
    if tuple(doc_ids) != tuple(loader.data.doc_ids):
      raise ConfigError(
          f"{_corpus_dir(config)}: the corpus rows differ from the training "
          "data's (config.data.corpus_path)"
      )
    centroids_mks, codes_nm = self.starting_codebooks(
        config,
        doc_ids,
        [beir.doc_text(t, x) for t, x in zip(titles, texts)],
        tokenizer,
        mesh,
    )
    extra = train_state.ExtraState(
        init=functools.partial(
            init_extra,
            centroids_mks=centroids_mks,
            codes_nm=codes_nm,
            teacher=bool(mse_weight),
        ),
        shardings=frozen_teacher.extra_shardings,
    )
    return base.TrainSpec(
        featurize=base.take_keys(),
        loss=functools.partial(
            loss,
            loss_fn=loss_spec.fn,
            temperature=config.loss.temperature,
            pooling=config.model.pooling,
            normalize=config.model.normalize,
            share_hard_negatives=config.loss.share_hard_negatives,
            ranking_weight=ranking_weight,
            margin_mse_weight=mse_weight,
            teacher_scale=scale,
        ),
        extra=extra,
    )

  def build_index(self, model, run_dir, docs_nd=None, *, engine="faiss"):
    """The run's PQ index: trained centroids + fixed codes.

    model: the run's `JpqQueryEncoder` (`kinds.load_run`); docs_nd None:
    the run's own corpus and codes; else [N, D] documents of another corpus
    embedded by the starting encoder (the document tower JPQ never
    trains), each sub-vector assigned its nearest trained centroid.
    """
    constants = read_run_constants(run_dir)
    centroids_mks = np.asarray(
        jax.device_get(model.centroids(jnp.asarray(constants[CENTROIDS])))
    )
    if docs_nd is None:
      return pq_index(centroids_mks, codes_nm=constants[CODES], engine=engine)
    return pq_index(centroids_mks, docs_nd=docs_nd, engine=engine)

  def serving_towers(
      self, model, tokenizer, run_cfg, export_cfg, *, corpus_texts
  ):
    raise ConfigError(
        "config.model.kind='jpq': a jpq run has no passage tower (documents "
        "are PQ codes); search it with Jpq.build_index"
    )


KIND = Jpq()
