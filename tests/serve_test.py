"""Tests for the HTTP endpoint (`retrieval_jax.serve`).

A one-layer all-MiniLM-L6-v2 (the packaged checkpoint cut to its first
layer, so training compiles in seconds) is trained two steps by the train
mode, exported, and served by `python -m retrieval_jax.serve` in a
subprocess that builds its index from LIMIT-small's corpus; requests go over
real HTTP. Oracles: the checkpoint's own encoder (`kinds.load_run` +
`text_encoder`) for the served query and index embeddings, and
`exact_topk` in this process for the rankings. `MicroBatcher` and the
signal shutdown are tested in-process with stand-ins for the model.
"""

import concurrent.futures
import http.client
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from absl.testing import absltest
import jax
import numpy as np
import safetensors.numpy

from retrieval_jax import export
from retrieval_jax import kinds
from retrieval_jax import pretrained
from retrieval_jax import serve
from retrieval_jax import serving
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.search import exact_topk
import test_util

QUERY_MAX_LENGTH = 16
PASSAGE_MAX_LENGTH = 32
# Server limits, small so the tests can cross them cheaply.
MAX_BATCH = 4
MAX_QUERIES = 8
MAX_QUERY_CHARS = 200
MAX_BODY_BYTES = 4096
QUERIES = [
    "Who likes Quokkas?",
    "Who likes Slide Rules?",
    "Who likes Oceanic Trenches and Snow Leopards?",
    "Naïve café owners in Zürich",
    "a",
    (
        "Who likes the very long list of things that goes on past the "
        "sixteen tokens the query tower reads?"
    ),
]
_CORPUS = test_util.LIMIT_SMALL / "corpus.jsonl"


def _one_layer_minilm(out_dir: pathlib.Path) -> pathlib.Path:
  """The packaged all-MiniLM-L6-v2 with only its first layer kept."""
  source = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
  shutil.copytree(
      source,
      out_dir,
      ignore=shutil.ignore_patterns("model.safetensors", "*.md"),
  )
  config = json.loads((out_dir / "config.json").read_text())
  config["num_hidden_layers"] = 1
  (out_dir / "config.json").write_text(json.dumps(config))
  weights = safetensors.numpy.load_file(source / "model.safetensors")
  safetensors.numpy.save_file(
      {
          k: v
          for k, v in weights.items()
          if ".layer." not in k or ".layer.0." in k
      },
      out_dir / "model.safetensors",
  )
  return out_dir


def _train_config(pretrained_dir):
  from configs import train as train_config  # pylint: disable=g-import-not-at-top

  config = train_config.get_config("smoke")
  with config.unlocked():
    config.model.pretrained = str(pretrained_dir)
    config.train.num_steps = 2
    config.checkpoint.every_steps = 2
    config.train.eval_before = False
    config.train.eval_after = False
    config.data.negatives = "none"
    config.data.group_size = 1
    config.export.query_max_length = QUERY_MAX_LENGTH
    config.export.passage_max_length = PASSAGE_MAX_LENGTH
  return config


def _request(url, path, payload=None, *, method=None, data=None):
  """(status, parsed JSON body, headers) of one request; never raises on 4xx."""
  if payload is not None:
    data = json.dumps(payload).encode()
  req = urllib.request.Request(url + path, data=data, method=method)
  try:
    with urllib.request.urlopen(req, timeout=120) as response:
      return response.status, json.loads(response.read()), response.headers
  except urllib.error.HTTPError as e:
    with e:
      return e.code, json.loads(e.read()), e.headers


class ServeTest(absltest.TestCase):
  """The CLI's server, from a trained checkpoint to HTTP answers."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))
    cls.root = pathlib.Path(tempfile.mkdtemp(prefix="rj_serve_"))
    model_dir = _one_layer_minilm(cls.root / "minilm_1layer")
    cls.workdir = cls.root / "train"
    config = _train_config(model_dir)
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrieval_jax.main",
            "--config=configs/train.py:smoke",
            f"--workdir={cls.workdir}",
            f"--config.model.pretrained={model_dir}",
            "--config.train.num_steps=2",
            "--config.train.eval_before=False",
            "--config.train.eval_after=False",
            "--config.data.negatives=none",
            "--config.data.group_size=1",
        ],
        cwd=test_util.REPO,
        env=test_util.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if train.returncode:
      shutil.rmtree(cls.root, ignore_errors=True)
      raise RuntimeError(f"training failed: {train.stderr[-3000:]}")
    cls.export_dir = cls.workdir / "export"
    export.export_from_workdir(config, cls.workdir, out_dir=cls.export_dir)

    cls.index_dir = cls.root / "index"
    cls.stdout_path = cls.root / "server.out"
    cls.stderr_path = cls.root / "server.err"
    with open(cls.stdout_path, "w") as out, open(cls.stderr_path, "w") as err:
      # Files, not pipes: a full pipe would stall the server's log writes.
      cls.server = subprocess.Popen(
          [
              sys.executable,
              "-m",
              "retrieval_jax.serve",
              f"--export={cls.export_dir}",
              f"--index={cls.index_dir}",
              f"--build_index_from={_CORPUS}",
              "--port=0",
              f"--max_batch={MAX_BATCH}",
              "--max_wait_ms=20",
              f"--max_queries={MAX_QUERIES}",
              f"--max_query_chars={MAX_QUERY_CHARS}",
              f"--max_body_bytes={MAX_BODY_BYTES}",
          ],
          cwd=test_util.REPO,
          env=dict(os.environ, PYTHONPATH=str(test_util.REPO)),
          stdout=out,
          stderr=err,
      )
    cls.requests_sent = 0
    cls.count_lock = threading.Lock()
    try:
      # The reference, while the server starts: the checkpoint's encoder.
      mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
      model, tokenizer, run_cfg, step = kinds.load_run(cls.workdir, mesh)
      cls.step = step
      kind = kinds.get(run_cfg["model"])
      doc_ids, titles, texts = beir.read_corpus(str(_CORPUS))
      cls.doc_ids = doc_ids
      cls.reference = {}
      for name, texts, max_length in (
          ("query", QUERIES, QUERY_MAX_LENGTH),
          (
              "passage",
              [beir.doc_text(t, x) for t, x in zip(titles, texts)],
              PASSAGE_MAX_LENGTH,
          ),
      ):
        encoder = kind.text_encoder(
            model, tokenizer, run_cfg, mesh, max_length=max_length
        )
        cls.reference[name] = encoder.encode(texts, progress=False)
      cls.url = cls._wait_for_url()
    except BaseException:
      cls.server.kill()
      cls.server.wait()
      shutil.rmtree(cls.root, ignore_errors=True)
      raise

  @classmethod
  def _wait_for_url(cls) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
      for line in cls.stdout_path.read_text().splitlines():
        if line.startswith("serving on "):
          return line.split()[-1]
      if cls.server.poll() is not None:
        raise RuntimeError(
            "the server exited: " + cls.stderr_path.read_text()[-3000:]
        )
      time.sleep(0.1)
    raise TimeoutError("the server did not start in 300 s")

  @classmethod
  def tearDownClass(cls):
    # SIGTERM: the server finishes, exits 0 and logged each request once.
    try:
      cls.server.send_signal(signal.SIGTERM)
      returncode = cls.server.wait(timeout=60)
      stderr = cls.stderr_path.read_text()
      assert returncode == 0, f"exit {returncode}: {stderr[-3000:]}"
      assert "shut down" in cls.stdout_path.read_text(), stderr[-3000:]
      logged = sum(
          1
          for line in stderr.splitlines()
          if any(f'"{m} /' in line for m in ("GET", "POST", "PUT", "DELETE"))
      )
      assert logged == cls.requests_sent, (logged, cls.requests_sent)
    finally:
      if cls.server.poll() is None:
        cls.server.kill()
      shutil.rmtree(cls.root, ignore_errors=True)
      super().tearDownClass()

  def request(self, path, payload=None, **kwargs):
    self.count_request()
    return _request(self.url, path, payload, **kwargs)

  @classmethod
  def count_request(cls):
    """Counts a request (the server must log each once); thread-safe."""
    with cls.count_lock:
      cls.requests_sent += 1

  def health(self) -> dict:
    status, body, _ = self.request("/health")
    self.assertEqual(status, 200)
    return body

  def test_health(self):
    body = self.health()
    self.assertEqual(body["status"], "ok")
    self.assertEqual(body["model"]["embedding_dim"], 384)
    self.assertEqual(body["model"]["query_max_length"], QUERY_MAX_LENGTH)
    self.assertEqual(body["model"]["metadata"]["step"], 2)
    self.assertEqual(body["index"]["num_docs"], len(self.doc_ids))
    self.assertEqual(body["index"]["metric"], "dot")
    self.assertEqual(
        body["index"]["metadata"]["passage_max_length"], PASSAGE_MAX_LENGTH
    )
    self.assertEqual(body["limits"]["max_queries"], MAX_QUERIES)
    self.assertEqual(body["batching"]["max_batch"], MAX_BATCH)

  def test_served_embeddings_equal_the_checkpoint_encoder(self):
    status, body, headers = self.request("/embed", {"queries": QUERIES})
    self.assertEqual(status, 200)
    self.assertEqual(headers["Content-Type"], "application/json")
    served = np.asarray(body["embeddings"], np.float32)
    reference = self.reference["query"]
    self.assertEqual(served.shape, (len(QUERIES), 384))
    self.assertEqual(reference.dtype, np.float32)
    self.assertEqual(body["dim"], 384)
    diff = float(np.abs(served - reference).max())
    a, b = served.astype(np.float64), reference.astype(np.float64)
    cosine = np.sum(a * b, 1) / (
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    )
    print(
        f"query embeddings, served vs checkpoint: max |diff| {diff:.2e}, "
        f"min cosine {cosine.min():.9f}"
    )
    self.assertLess(diff, 1e-6)
    self.assertGreater(cosine.min(), 1 - 1e-6)
    # The long query was cut at the query tower's 16 tokens, as in training.
    self.assertLess(np.abs(served[-1] - reference[-1]).max(), 1e-6)

  def test_built_index_equals_the_checkpoint_passage_encoder(self):
    index = serving.load_index(self.index_dir)
    self.assertEqual(index.doc_ids, self.doc_ids)
    diff = float(np.abs(index.embeddings_nd - self.reference["passage"]).max())
    print(f"index rows vs checkpoint passage encoder: max |diff| {diff:.2e}")
    self.assertLess(diff, 1e-6)
    manifest = json.loads((self.export_dir / "manifest.json").read_text())
    self.assertEqual(
        index.info["metadata"]["passage_params_sha256"],
        manifest["sha256"]["params.safetensors"],
    )

  def test_search_equals_exact_topk_of_served_embeddings(self):
    _, body, _ = self.request("/embed", {"queries": QUERIES})
    served = np.asarray(body["embeddings"], np.float32)
    index = serving.load_index(self.index_dir)
    for k in (None, 1, 5, len(self.doc_ids)):
      with self.subTest(k=k):
        payload = {"queries": QUERIES}
        if k is not None:
          payload["k"] = k
        status, body, _ = self.request("/search", payload)
        self.assertEqual(status, 200, body)
        k = k or 10
        self.assertEqual(body["k"], k)
        scores_qk, rows_qk = exact_topk.exact_topk(
            served, index.embeddings_nd, k, metric=index.metric
        )
        self.assertLen(body["results"], len(QUERIES))
        for result, rows, scores in zip(body["results"], rows_qk, scores_qk):
          self.assertEqual(result["ids"], [self.doc_ids[r] for r in rows])
          np.testing.assert_allclose(result["scores"], scores, atol=1e-6)

  def test_long_request_is_split_into_encoder_batches(self):
    before = self.health()["stats"]
    queries = (QUERIES * 2)[:MAX_QUERIES]  # 8 queries, batches of 4
    status, body, _ = self.request("/embed", {"queries": queries})
    self.assertEqual(status, 200)
    after = self.health()["stats"]
    self.assertGreaterEqual(after["encoder_calls"] - before["encoder_calls"], 2)
    self.assertLessEqual(after["largest_batch"], MAX_BATCH)
    expected = np.concatenate([self.reference["query"]] * 2)[:MAX_QUERIES]
    self.assertLess(
        np.abs(np.asarray(body["embeddings"]) - expected).max(), 1e-6
    )

  def test_concurrent_requests_are_all_answered(self):
    index = serving.load_index(self.index_dir)
    scores_qk, rows_qk = exact_topk.exact_topk(
        self.reference["query"], index.embeddings_nd, 3, metric=index.metric
    )
    before = self.health()["stats"]

    def one(i):
      j = i % len(QUERIES)
      if i % 2:
        _, body, _ = self.request("/search", {"queries": [QUERIES[j]], "k": 3})
        return j, body["results"][0]["ids"]
      _, body, _ = self.request("/embed", {"queries": [QUERIES[j]]})
      return j, body["embeddings"][0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      answers = list(pool.map(one, range(24)))
    for i, (j, answer) in enumerate(answers):
      if i % 2:
        self.assertEqual(answer, [self.doc_ids[r] for r in rows_qk[j]])
      else:
        self.assertLess(
            np.abs(np.asarray(answer) - self.reference["query"][j]).max(), 1e-6
        )
    after = self.health()["stats"]
    calls = after["encoder_calls"] - before["encoder_calls"]
    # Timing decides how many share a call: reported, not asserted (see
    # MicroBatcherTest for the deterministic check).
    print(f"24 concurrent one-query requests: {calls} encoder calls")
    self.assertLessEqual(calls, 24)

  def test_bad_requests_get_4xx_json_errors(self):
    long_query = "x" * (MAX_QUERY_CHARS + 1)
    cases = [
        # (path, body bytes, expected status, expected error text)
        ("/search", b"not json", 400, "body is not JSON"),
        ("/search", b"\x80\x81", 400, "body is not JSON"),
        ("/search", b"[1, 2]", 400, "body is a JSON list"),
        ("/search", b"{}", 400, "missing key(s) ['queries']"),
        ("/search", b'{"queries": ["a"], "x": 1}', 400, "unknown key(s) ['x']"),
        ("/embed", b'{"queries": ["a"], "k": 1}', 400, "unknown key(s) ['k']"),
        ("/search", b'{"queries": "abc"}', 400, "queries is str, expected"),
        (
            "/search",
            b'{"queries": ["a", 1]}',
            400,
            "queries[1] is int, expected str",
        ),
        (
            "/embed",
            b'{"queries": [null]}',
            400,
            "queries[0] is NoneType, expected str",
        ),
        ("/search", b'{"queries": []}', 400, "queries is empty"),
        ("/search", b'{"queries": ["ok", " "]}', 400, "queries[1] is empty"),
        (
            "/search",
            json.dumps({"queries": ["q"] * (MAX_QUERIES + 1)}).encode(),
            413,
            "--max_queries",
        ),
        (
            "/embed",
            json.dumps({"queries": [long_query]}).encode(),
            413,
            f"queries[0] has {MAX_QUERY_CHARS + 1} characters",
        ),
        (
            "/search",
            b'{"queries": ["a"], "k": 0}',
            400,
            "k=0 must be at least 1",
        ),
        ("/search", b'{"queries": ["a"], "k": -3}', 400, "k=-3"),
        (
            "/search",
            b'{"queries": ["a"], "k": "3"}',
            400,
            "k is str, expected int",
        ),
        ("/search", b'{"queries": ["a"], "k": 2.0}', 400, "k is float"),
        ("/search", b'{"queries": ["a"], "k": true}', 400, "k is bool"),
        (
            "/search",
            json.dumps({"queries": ["a"], "k": len(self.doc_ids) + 1}).encode(),
            400,
            f"more than the index's {len(self.doc_ids)} documents",
        ),
        (
            "/search",
            json.dumps({"queries": ["a" * 100] * 50}).encode(),
            413,
            "--max_body_bytes",
        ),
    ]
    for path, data, code, text in cases:
      with self.subTest(body=data[:40]):
        status, body, headers = self.request(path, data=data)
        self.assertEqual(status, code, body)
        self.assertIn(text, body["error"])
        self.assertEqual(headers["Content-Type"], "application/json")

  def test_unknown_routes_and_methods(self):
    status, body, _ = self.request("/nope")
    self.assertEqual(status, 404)
    self.assertIn("no route GET /nope", body["error"])
    status, body, headers = self.request("/search")
    self.assertEqual(status, 405)
    self.assertEqual(headers["Allow"], "POST")
    status, body, _ = self.request("/health", data=b"{}")
    self.assertEqual(status, 405)
    status, body, _ = self.request("/search", method="DELETE")
    self.assertEqual(status, 405)
    self.assertIn("takes POST, not DELETE", body["error"])

  def test_missing_content_length_is_411(self):
    host, port = self.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    self.count_request()
    try:
      connection.putrequest("POST", "/search")
      connection.endheaders()
      response = connection.getresponse()
      self.assertEqual(response.status, 411)
      self.assertIn("Content-Length", json.loads(response.read())["error"])
    finally:
      connection.close()


class MicroBatcherTest(absltest.TestCase):
  """The batching worker, with a stand-in encoder: row i embeds "q<i>"."""

  def setUp(self):
    super().setUp()
    self.calls = []

  def encode(self, texts):
    self.calls.append(list(texts))
    return np.asarray([[float(t[1:])] for t in texts], np.float32).reshape(
        -1, 1
    )

  def make(self, **kwargs):
    batcher = serve.MicroBatcher(self.encode, **kwargs)
    self.addCleanup(batcher.close)
    return batcher

  def test_concurrent_requests_share_one_encoder_call(self):
    # A long max wait: the batch closes when full, so no timing enters.
    batcher = self.make(max_batch=8, max_wait_s=60)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      results = list(pool.map(lambda i: batcher.embed([f"q{i}"]), range(8)))
    for i, emb in enumerate(results):
      np.testing.assert_array_equal(emb, [[i]])
    self.assertLen(self.calls, 1)
    self.assertCountEqual(self.calls[0], [f"q{i}" for i in range(8)])
    self.assertEqual(
        batcher.stats, {"encoder_calls": 1, "texts": 8, "largest_batch": 8}
    )

  def test_long_list_is_split_into_encoder_sized_parts(self):
    batcher = self.make(max_batch=4, max_wait_s=0)
    emb = batcher.embed([f"q{i}" for i in range(10)])
    np.testing.assert_array_equal(emb[:, 0], np.arange(10))
    self.assertEqual([len(c) for c in self.calls], [4, 4, 2])

  def test_a_part_that_does_not_fit_waits_for_the_next_call(self):
    # Whichever comes first (and whether the wait runs out before the
    # other arrives), 3 + 2 texts never share a call of at most 4.
    batcher = self.make(max_batch=4, max_wait_s=0.2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(batcher.embed, ["q0", "q1", "q2"])
      second = pool.submit(batcher.embed, ["q3", "q4"])
      np.testing.assert_array_equal(first.result()[:, 0], [0, 1, 2])
      np.testing.assert_array_equal(second.result()[:, 0], [3, 4])
    self.assertCountEqual(self.calls, [["q0", "q1", "q2"], ["q3", "q4"]])

  def test_encoder_errors_reach_the_waiting_request(self):
    def fail(texts):
      raise ValueError(f"cannot embed {texts}")

    batcher = serve.MicroBatcher(fail, max_batch=4, max_wait_s=0)
    self.addCleanup(batcher.close)
    with self.assertRaisesRegex(ValueError, "cannot embed"):
      batcher.embed(["q0"])

  def test_closed_batcher_refuses_work(self):
    batcher = self.make(max_batch=4, max_wait_s=0)
    np.testing.assert_array_equal(batcher.embed(["q7"]), [[7]])
    batcher.close()
    with self.assertRaisesRegex(RuntimeError, "closed"):
      batcher.embed(["q1"])


class _SlowApp:
  """A `SearchApp` stand-in whose one route blocks until released."""

  routes = {"/slow": ("GET", None)}

  def __init__(self):
    self.entered = threading.Event()
    self.release = threading.Event()
    self.closed = False

  def handle(self, method, path, headers, rfile):
    del method, path, headers, rfile
    self.entered.set()
    self.release.wait(60)
    return 200, {"done": True}, ""

  def close(self):
    self.closed = True


class SignalShutdownTest(absltest.TestCase):
  """SIGINT / SIGTERM stop the server after the request in flight."""

  def test_signal_finishes_the_request_in_flight(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      with self.subTest(signal=sig.name):
        app = _SlowApp()
        server = serve.SearchServer(("127.0.0.1", 0), app)
        # Never hang the suite: give up after 60 s.
        watchdog = threading.Timer(60, server.shutdown)
        watchdog.start()
        answers = []

        def client():
          answers.append(_request(server.url, "/slow"))

        def signal_then_release():
          app.entered.wait(60)
          os.kill(os.getpid(), sig)
          time.sleep(0.2)  # shutdown begins with the request still open
          app.release.set()

        threads = [
            threading.Thread(target=client),
            threading.Thread(target=signal_then_release),
        ]
        for t in threads:
          t.start()
        previous = signal.getsignal(sig)
        serve.serve_until_signalled(server)  # returns after the signal
        watchdog.cancel()
        for t in threads:
          t.join(60)
        self.assertIs(signal.getsignal(sig), previous)
        self.assertTrue(app.closed)
        self.assertEqual([a[:2] for a in answers], [(200, {"done": True})])
        with self.assertRaises(OSError):  # no longer listening
          urllib.request.urlopen(server.url + "/slow", timeout=5)


if __name__ == "__main__":
  absltest.main()
