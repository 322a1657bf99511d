r"""M2-BERT on long documents: train and evaluate on a LoCo-style task.

The task is built at start-up from a BEIR collection on disk (SciFact by
default, ../shared/data/scifact): its abstracts, shuffled with a fixed seed,
are packed into documents of `long_docs.min_tokens` to `long_docs.max_tokens`
tokens, and a query's relevant document is the one holding its judged
abstract (retrieval_jax/data/long_documents.py). The collection is written
to <workdir>/long_docs and reused by later runs with the same settings.

The default model is a small M2 encoder that trains on 2 CPU cores: 2
layers of width 384 whose word embeddings start from all-MiniLM-L6-v2's
(same vocabulary and width); everything else starts at random. It reads a
whole document (up to 4,096 tokens), which no 512-token encoder can.

  python -m retrieval_jax.main --config configs/m2_long_docs.py \
      --workdir /tmp/rj_m2_long_docs

Crop + MoCo pretraining of the same M2 on the long documents alone (no
queries; smoke: `:smoke,pretrain=crop`):

  python -m retrieval_jax.main --config configs/m2_long_docs.py:pretrain=crop \
      --workdir /tmp/rj_m2_crop

`--config.model.m2.identity_init=True` starts every mixer at the identity
(long filters zero, residual skip 1, output projection I), so the untrained
encoder is close to a mean of its copied word embeddings.

Results and the baselines (BM25; all-MiniLM-L6-v2 truncated at 512 tokens)
are in experiments/m2_long_docs/README.md.

Arguments (`configs/m2_long_docs.py:a=1,b`):
  smoke        tiny run (LIMIT-small packed into ~300-token documents,
               4 steps): seconds
  model=NAME   small (default) | m2-bert-80m-{128,2k,8k,32k} (the 80M
               model at that length: an accelerator job)
  loss=NAME    infonce (default) | orthogonal_projection (one-query
               batches) | any key of retrieval_jax.losses.LOSSES
  pretrain=crop  no queries: crop + MoCo pairs of the long documents
               themselves (configs/train.py:pretrain_crop's spans and
               queue), crops of up to half a document (2,048 tokens) read
               against crops of up to 4,096; evaluated on the same test
               queries
  seed=N       data order, initialisation and dropout seed
  shared=DIR   where the shared collections live (default ../shared/data)
"""

import ml_collections

from configs import common
from configs import train as train_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the long-document config; `arg` selects variants."""
  arg = common.parse_arg(
      arg,
      smoke=False,
      model="small",
      loss="infonce",
      pretrain="",
      seed=0,
      shared=str(common.REPO_ROOT.parent / "shared" / "data"),
  )
  if arg.pretrain not in ("", "crop"):
    raise ValueError(f"pretrain={arg.pretrain}: expected crop")
  pretrain = "pretrain_crop," if arg.pretrain else ""
  config = train_config.get_config(
      f"{pretrain}seed={arg.seed},loss={arg.loss},shared={arg.shared}"
  )
  config.unlock()

  config.long_docs = ml_collections.ConfigDict()
  # BEIR collection whose passages are packed into long documents.
  config.long_docs.source = f"{arg.shared}/scifact"
  # Qrels splits carried over (train: fine-tuning, test: evaluation).
  config.long_docs.splits = ("train", "test")
  # Document lengths, drawn log-uniformly in [min_tokens, max_tokens]
  # (WordPiece tokens of the model's vocabulary, [CLS]/[SEP] excluded).
  config.long_docs.min_tokens = 2048
  # Upper end of that range (a document plus [CLS]/[SEP] fits max_length).
  config.long_docs.max_tokens = 4000
  # Seed of the passage shuffle and the length draws.
  config.long_docs.seed = 0
  # Where the collection is written ("" = <workdir>/long_docs).
  config.long_docs.out_dir = ""

  model = config.model
  # The Monarch Mixer encoder (retrieval_jax/models/m2_encoder.py).
  model.architecture = "m2"
  # Tokenizer (and with m2.init_embeddings, the starting word embeddings).
  model.pretrained = "all-MiniLM-L6-v2"
  # Its hyperparameters: the 80M 8k preset, overridden below.
  model.m2 = common.m2_block("m2-bert-80m-8k")
  # Mean of the token states: a useful embedding from the first step on,
  # where a randomly initialised pooler is not; the 80M presets use the
  # reference's trained pooler.
  model.pooling = "mean"
  # Cosine similarity, as the reference's retrieval evaluation.
  model.normalize = True
  # Whole documents: max_tokens plus [CLS] and [SEP] fit.
  model.max_length = 4096
  # Dropout while training.
  model.dropout = True
  if arg.model == "small":
    model.m2.num_layers = 2
    model.m2.hidden_size = 384
    model.m2.intermediate_size = 1536
    model.m2.max_position_embeddings = 4096
    model.m2.filter_order = 64
    model.m2.init_embeddings = True
  else:
    model.m2.preset = arg.model
    model.pooling = "pooler"
    model.max_length = int(
        {
            "m2-bert-80m-128": 128,
            "m2-bert-80m-2k": 2048,
            "m2-bert-80m-8k": 8192,
            "m2-bert-80m-32k": 32768,
        }.get(arg.model, 0)
    )
  # Initialisation seed follows the run's seed.
  model.m2.seed = arg.seed

  data = config.data
  # Filled in at start-up with the built collection (long_docs.out_dir).
  data.path = ""
  if not arg.pretrain:
    # The built collection is a BEIR directory.
    data.format = "beir"
    # Its train queries (SciFact's train judgments).
    data.train_split = "train"
    # In-batch negatives only: a hard negative would double the documents
    # encoded per step.
    data.negatives = "none"
    # Documents per query in a batch: its positive only.
    data.group_size = 1
    # One positive document per query.
    data.max_positives = 1
    # Query token budget.
    data.query_max_length = 48
    # Documents are read whole.
    data.passage_max_length = model.max_length

  # Softmax temperature for the contrastive losses.
  config.loss.temperature = 0.05
  if arg.loss == "orthogonal_projection":
    # Cosines, one query (its document and the others' as negatives).
    config.loss.temperature = 1.0

  train = config.train
  # Queries (and documents) per step.
  train.batch_size = 8
  # 640 queries: most of one epoch of the 809 SciFact train queries.
  train.num_steps = 80
  # Log every N steps.
  train.log_every = 5
  # No evaluation of the random start: it saves a corpus pass (~7 min).
  train.eval_before = False
  # GradCache: the 8 documents of a step are embedded and back-propagated
  # 4 at a time, so activation memory is that of 4 long documents.
  train.grad_cache_chunks = (2, 2)

  optim = config.optim
  # Most weights start at random: a from-scratch learning rate.
  optim.learning_rate = 5e-4
  # Linear warm-up over the first 10% of steps.
  optim.warmup_fraction = 0.1
  # Decoupled weight decay.
  optim.weight_decay = 0.01

  # Checkpoint every N steps.
  config.checkpoint.every_steps = 25
  # The exported passage tower reads whole documents.
  config.export.passage_max_length = model.max_length

  config.evals = ml_collections.ConfigDict()
  # The test queries against the long documents (path set at start-up).
  config.evals.long_docs = train_config._eval_block(  # pylint: disable=protected-access
      "", "test", ("ndcg@10", "recall@1", "recall@10", "mrr@10"), top_k=100
  )
  # Long documents: few per encoder call.
  config.evals.long_docs.batch_size = 4

  if arg.smoke:
    config.long_docs.source = str(common.REPO_ROOT / "data" / "limit-small")
    config.long_docs.splits = ("train", "dev")
    config.long_docs.min_tokens = 200
    config.long_docs.max_tokens = 400
    config.evals.long_docs.split = "dev"
    config.evals.long_docs.max_queries = 16
    model.m2.num_layers = 1
    model.m2.hidden_size = 384
    model.m2.intermediate_size = 384
    model.m2.max_position_embeddings = 512
    model.m2.filter_order = 16
    model.max_length = 512
    data.passage_max_length = 512
    config.export.passage_max_length = 512
    data.query_max_length = 16
    train.batch_size = 4
    train.num_steps = 4
    train.log_every = 1
    train.eval_before = False
    train.grad_cache_chunks = (0, 0)
    config.checkpoint.every_steps = 2

  if arg.pretrain:
    _pretrain(config, smoke=arg.smoke)
  config.lock()
  return config


def _pretrain(config, *, smoke: bool) -> None:
  """Crop + MoCo on the built collection's documents (no queries): the
  pair settings of configs/train.py:pretrain_crop at long-document size."""
  # Crops of 10-50 % of a document's first max_length tokens.
  config.data.passage_max_length = config.model.max_length
  # A query crop is at most half of that window.
  config.data.query_max_length = config.model.max_length // 2
  # MoCo has no GradCache: whole batches.
  config.train.grad_cache_chunks = (0, 0)
  # Keys of past batches: 32 batches of 8, under half of the 565 documents
  # (keys of a batch's own documents are not negatives: kinds/moco.py).
  config.model.moco_queue_size = 32 * config.train.batch_size
  # The untrained model's row (step 0) and the pretrained one's.
  config.train.eval_before = True
  if smoke:
    return
  # About 2.8 passes over the 565 documents.
  config.train.num_steps = 200
  # Checkpoint every N steps.
  config.checkpoint.every_steps = 25
