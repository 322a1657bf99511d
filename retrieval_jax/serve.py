r"""HTTP search over an exported query tower and a dense index.

  python -m retrieval_jax.serve --export DIR --index DIR --port 8080 \
      [--host 127.0.0.1] [--build_index_from corpus.jsonl]

--export is what `--mode=export` writes (`serving.ServingModel`); --index an
index directory (`serving.load_index`, or one `--build_index_from` writes
first). Standard library `ThreadingHTTPServer` (HTTP/1.0, one thread per
connection; run it behind a proxy for TLS and keep-alive). Routes
GET /health, POST /search, POST /embed, their JSON and error codes: README
("Serving over HTTP"). Queries that arrive together share one encoder call
(`MicroBatcher`); search is `exact_topk.search`. Bad input gets
{"error": "..."} naming the problem; SIGINT/SIGTERM finish the requests in
flight and exit 0.
"""

from collections.abc import Callable, Mapping, Sequence
import concurrent.futures
import dataclasses
import http.server
import json
import pathlib
import queue
import signal
import threading
import time
from typing import Any
import urllib.parse

from absl import logging
import numpy as np

from retrieval_jax import serving
from retrieval_jax import sharding
from retrieval_jax.data import beir
from retrieval_jax.search import exact_topk

# Bodies over the limit are read and dropped up to this size first: closing
# with unread data makes the kernel reset the connection, and the client
# would see that instead of the 413.
_DRAIN_LIMIT_BYTES = 16 << 20
_STOP = object()


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _drain(headers: Mapping[str, str], rfile) -> None:
  """Reads and drops a refused request's body (up to _DRAIN_LIMIT_BYTES)."""
  try:
    length = int(headers.get("Content-Length") or 0)
    if 0 < length <= _DRAIN_LIMIT_BYTES:
      rfile.read(length)
  except (ValueError, OSError):
    pass  # nothing more to do for this client


class RequestError(Exception):
  """A request the server refuses: HTTP `status` and a message for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask; the flags of the same names set them."""

  max_queries: int = 256  # queries per request
  max_query_chars: int = 2048  # characters per query (tokenizer CPU time)
  max_body_bytes: int = 1 << 20  # request body (Content-Length)
  default_k: int = 10  # k when a /search request leaves it out


def parse_body(body: bytes, required: Sequence[str], optional: Sequence[str]):
  """The JSON object of a request body; RequestError(400) if it is not one.

  Keys must include `required` and come from `required` + `optional`.
  """
  try:
    request = json.loads(body)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise RequestError(400, f"body is not JSON: {e}") from None
  if not isinstance(request, dict):
    raise RequestError(
        400,
        f"body is a JSON {type(request).__name__}, expected an object with "
        f"keys {list(required) + list(optional)}",
    )
  missing = [k for k in required if k not in request]
  if missing:
    raise RequestError(400, f"missing key(s) {missing}")
  unknown = sorted(set(request) - set(required) - set(optional))
  if unknown:
    raise RequestError(
        400,
        f"unknown key(s) {unknown}; expected {list(required) + list(optional)}",
    )
  return request


def check_queries(value: Any, limits: Limits) -> list[str]:
  """`value` as a list of 1..max_queries non-empty strings; else RequestError.

  Empty and whitespace-only queries are refused: they embed [CLS] [SEP]
  alone, a vector that ranks documents for no reason the client meant.
  """
  if not isinstance(value, list):
    raise RequestError(
        400, f"queries is {type(value).__name__}, expected a list of str"
    )
  try:
    queries = serving.check_texts(value, "queries")
  except TypeError as e:
    raise RequestError(400, str(e)) from None
  if not queries:
    raise RequestError(400, "queries is empty")
  if len(queries) > limits.max_queries:
    raise RequestError(
        413,
        f"{len(queries)} queries; at most {limits.max_queries} per request "
        "(--max_queries)",
    )
  for i, text in enumerate(queries):
    if not text.strip():
      raise RequestError(400, f"queries[{i}] is empty or whitespace only")
    if len(text) > limits.max_query_chars:
      raise RequestError(
          413,
          f"queries[{i}] has {len(text)} characters; at most "
          f"{limits.max_query_chars} (--max_query_chars)",
      )
  return queries


def check_k(value: Any, num_docs: int) -> int:
  """`value` as an int in 1..num_docs; else RequestError(400)."""
  # bool is an int subclass; 10.0 is a float: both refused, not coerced.
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(400, f"k is {type(value).__name__}, expected int")
  if value < 1:
    raise RequestError(400, f"k={value} must be at least 1")
  if value > num_docs:
    raise RequestError(
        400, f"k={value} is more than the index's {num_docs} documents"
    )
  return value


class MicroBatcher:
  """Embeds texts from many threads in shared encoder calls.

  A worker thread takes the oldest waiting part, then others until it holds
  max_batch texts or max_wait_s has passed since it took the first; one
  `encode_fn(texts) -> [n, D]` call embeds them all. `embed` splits a longer
  list into parts of at most max_batch texts.
  """

  def __init__(
      self,
      encode_fn: Callable[[list[str]], np.ndarray],
      *,
      max_batch: int,
      max_wait_s: float,
  ):
    if max_batch < 1 or max_wait_s < 0:
      raise ValueError(
          f"max_batch={max_batch} must be >= 1, max_wait_s={max_wait_s} >= 0"
      )
    self.max_batch = int(max_batch)
    self.max_wait_s = float(max_wait_s)
    self._encode_fn = encode_fn
    self._queue = queue.Queue()
    self._lock = threading.Lock()
    self._closed = False
    self._stats = {"encoder_calls": 0, "texts": 0, "largest_batch": 0}
    self._thread = threading.Thread(
        target=self._run, name="micro-batcher", daemon=True
    )
    self._thread.start()

  @property
  def stats(self) -> dict:
    """{"encoder_calls", "texts", "largest_batch"} so far (a copy)."""
    with self._lock:
      return dict(self._stats)

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """[len(texts), D] embeddings in input order; blocks until done."""
    futures = []
    with self._lock:  # no part may slip in behind the stop marker
      if self._closed:
        raise RuntimeError("the batcher is closed (server shutting down)")
      for lo in range(0, len(texts), self.max_batch):
        future = concurrent.futures.Future()
        self._queue.put((list(texts[lo : lo + self.max_batch]), future))
        futures.append(future)
    if not futures:
      return np.asarray(self._encode_fn([]))
    return np.concatenate([f.result() for f in futures])

  def close(self) -> None:
    """Embeds what is queued, then stops the worker."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      self._queue.put(_STOP)
    self._thread.join()

  def _run(self) -> None:
    held = None  # a part that did not fit in the previous batch
    while True:
      item = held if held is not None else self._queue.get()
      held = None
      if item is _STOP:
        return
      batch, size = [item], len(item[0])
      deadline = time.monotonic() + self.max_wait_s
      while size < self.max_batch:
        remaining = deadline - time.monotonic()
        try:
          # Parts already queued join even once the wait is over.
          if remaining > 0:
            item = self._queue.get(timeout=remaining)
          else:
            item = self._queue.get_nowait()
        except queue.Empty:
          break
        if item is _STOP or size + len(item[0]) > self.max_batch:
          held = item
          break
        batch.append(item)
        size += len(item[0])
      self._encode(batch)

  def _encode(self, batch) -> None:
    texts = [t for part, _ in batch for t in part]
    try:
      emb_nd = np.asarray(self._encode_fn(texts))
    except Exception as e:  # pylint: disable=broad-except
      for _, future in batch:  # each waiting request gets the error
        future.set_exception(e)
      return
    with self._lock:
      self._stats["encoder_calls"] += 1
      self._stats["texts"] += len(texts)
      self._stats["largest_batch"] = max(
          self._stats["largest_batch"], len(texts)
      )
    start = 0
    for part, future in batch:
      future.set_result(emb_nd[start : start + len(part)])
      start += len(part)


class Searcher:
  """Exact top-k over a `DenseIndex`, placed once on `device`.

  Queries pad to a power-of-two count and k rounds up to one (then both are
  cut back), bounding the compiled shapes; the first k of an exact top-K are
  the exact top-k, ties included (both go to the lower row).
  """

  def __init__(self, index: serving.DenseIndex, device):
    self.index = index
    self.corpus = exact_topk.encode_corpus(
        index.embeddings_nd,
        metric=index.metric,
        mesh=sharding.make_mesh(devices=[device]),
    )

  def search(self, queries_qd: np.ndarray, k: int):
    """(rows_qk int32, scores_qk float32) of the k best documents per query."""
    num_queries, dim = queries_qd.shape
    padded_bd = np.zeros((_next_power_of_two(num_queries), dim), np.float32)
    padded_bd[:num_queries] = queries_qd
    width = min(_next_power_of_two(k), self.index.num_docs)
    scores_bw, rows_bw = exact_topk.search(self.corpus, padded_bd, width)
    return rows_bw[:num_queries, :k], scores_bw[:num_queries, :k]


class SearchApp:
  """The routes, independent of the HTTP server; `handle` answers one request."""

  def __init__(
      self,
      model: serving.ServingModel,
      index: serving.DenseIndex,
      *,
      limits: Limits = Limits(),
      max_batch: int = 64,
      max_wait_s: float = 0.005,
  ):
    if index.embedding_dim != model.embedding_dim:
      raise ValueError(
          f"index {index.directory} holds {index.embedding_dim}-d rows, the "
          f"export {model.export_dir} embeds into {model.embedding_dim}-d"
      )
    manifest = model.manifest
    built_with = index.info.get("metadata", {}).get("passage_params_sha256")
    params_file = manifest["towers"]["passage"]["params_file"]
    # Only `build_index` records its tower; rows of another model would
    # serve, silently wrong, so say so (same width, so no hard error).
    if built_with and built_with != manifest["sha256"][params_file]:
      logging.warning(
          "index %s was built with other passage weights than %s's: its "
          "scores mean little for this query tower",
          index.directory,
          model.export_dir,
      )
    self.model = model
    self.index = index
    self.limits = limits
    self.searcher = Searcher(index, model.device)
    self.batcher = MicroBatcher(
        lambda texts: model.encode_queries(texts, batch_size=max_batch),
        max_batch=max_batch,
        max_wait_s=max_wait_s,
    )
    self._lock = threading.Lock()
    self._requests = 0
    self.routes = {
        "/health": ("GET", self._health),
        "/search": ("POST", self._search),
        "/embed": ("POST", self._embed),
    }

  def warm_up(self) -> None:
    """Compiles the one-query shapes before the first request."""
    emb_1d = self.model.encode_queries(["warm up"])
    self.searcher.search(
        emb_1d, min(self.limits.default_k, self.index.num_docs)
    )

  def close(self) -> None:
    """Stops the encoder worker (after the requests in flight)."""
    self.batcher.close()

  def info(self) -> dict:
    """What /health reports."""
    manifest = self.model.manifest
    tower = manifest["towers"]["query"]
    with self._lock:
      requests = self._requests
    return {
        "status": "ok",
        "model": {
            "export_dir": str(self.model.export_dir),
            "embedding_dim": self.model.embedding_dim,
            "query_max_length": tower["max_length"],
            "length_mode": tower["length_mode"],
            "pooling": tower["pooling"],
            "normalize": tower["normalize"],
            "created": manifest.get("created"),
            "metadata": manifest.get("metadata", {}),
            "device": str(self.model.device),
        },
        "index": {
            "dir": str(self.index.directory),
            "num_docs": self.index.num_docs,
            "embedding_dim": self.index.embedding_dim,
            "metric": self.index.metric,
            "metadata": self.index.info.get("metadata", {}),
        },
        "limits": dataclasses.asdict(self.limits),
        "batching": {
            "max_batch": self.batcher.max_batch,
            "max_wait_ms": self.batcher.max_wait_s * 1e3,
        },
        "stats": {"requests": requests, **self.batcher.stats},
    }

  def handle(
      self, method: str, path: str, headers: Mapping[str, str], rfile
  ) -> tuple[int, dict, str]:
    """(status, JSON response, note for the log line) of one request.

    rfile: the request body stream, read only once the headers pass.
    """
    with self._lock:
      self._requests += 1
    route = urllib.parse.urlsplit(path).path
    body_read = False
    try:
      if route not in self.routes:
        raise RequestError(
            404,
            f"no route {method} {route}; routes: "
            + ", ".join(f"{m} {r}" for r, (m, _) in self.routes.items()),
        )
      allowed, fn = self.routes[route]
      if method != allowed:
        raise RequestError(405, f"{route} takes {allowed}, not {method}")
      if method == "GET":
        return 200, fn(), ""
      body_read = True
      return fn(self._read_body(headers, rfile))
    except RequestError as e:
      if not body_read:
        _drain(headers, rfile)
      return e.status, {"error": e.message}, e.message

  def _read_body(self, headers: Mapping[str, str], rfile) -> bytes:
    length = headers.get("Content-Length")
    if length is None:
      raise RequestError(411, "Content-Length is required")
    try:
      length = int(length)
    except ValueError:
      raise RequestError(
          400, f"Content-Length {length!r} is not an int"
      ) from None
    if length < 0:
      raise RequestError(400, f"Content-Length {length} is negative")
    try:
      if length > self.limits.max_body_bytes:
        _drain(headers, rfile)
        raise RequestError(
            413,
            f"body of {length} bytes; at most {self.limits.max_body_bytes} "
            "(--max_body_bytes)",
        )
      body = rfile.read(length)
    except OSError as e:  # a timeout (`_Handler.timeout`) or a reset
      raise RequestError(400, f"reading the body failed: {e}") from None
    if len(body) != length:
      raise RequestError(400, f"body ended after {len(body)} of {length} bytes")
    return body

  def _health(self) -> dict:
    return self.info()

  def _search(self, body: bytes) -> tuple[int, dict, str]:
    request = parse_body(body, ("queries",), ("k",))
    queries = check_queries(request["queries"], self.limits)
    k = check_k(
        request.get("k", min(self.limits.default_k, self.index.num_docs)),
        self.index.num_docs,
    )
    rows_qk, scores_qk = self.searcher.search(self.batcher.embed(queries), k)
    doc_ids = self.index.doc_ids
    results = [
        {"ids": [doc_ids[r] for r in rows], "scores": scores.tolist()}
        for rows, scores in zip(rows_qk.tolist(), scores_qk)
    ]
    return 200, {"k": k, "results": results}, f"{len(queries)} queries k={k}"

  def _embed(self, body: bytes) -> tuple[int, dict, str]:
    request = parse_body(body, ("queries",), ())
    queries = check_queries(request["queries"], self.limits)
    emb_nd = self.batcher.embed(queries)
    # float32 -> float -> JSON repr round-trips exactly.
    return (
        200,
        {"embeddings": emb_nd.tolist(), "dim": int(emb_nd.shape[1])},
        f"{len(queries)} queries",
    )


class _Handler(http.server.BaseHTTPRequestHandler):
  """Hands each request to the server's `SearchApp`; logs one line."""

  server_version = "retrieval_jax.serve/1"
  # A stalled client frees its thread (and shutdown) after this many seconds.
  timeout = 30

  def do_GET(self):  # pylint: disable=invalid-name
    self._respond("GET")

  def do_POST(self):  # pylint: disable=invalid-name
    self._respond("POST")

  def do_PUT(self):  # pylint: disable=invalid-name
    self._respond("PUT")

  def do_DELETE(self):  # pylint: disable=invalid-name
    self._respond("DELETE")

  def _respond(self, method: str) -> None:
    start = time.perf_counter()
    try:
      status, payload, note = self.server.app.handle(
          method, self.path, self.headers, self.rfile
      )
    except Exception as e:  # pylint: disable=broad-except
      # A bug, not bad input: the client still gets JSON, the log the trace.
      logging.exception("%s %s failed", method, self.path)
      status, payload, note = 500, {"error": f"internal error: {e}"}, str(e)
    body = json.dumps(payload).encode()
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      if status == 405:
        allowed = self.server.app.routes[urllib.parse.urlsplit(self.path).path]
        self.send_header("Allow", allowed[0])
      self.end_headers()
      self.wfile.write(body)
    except OSError as e:  # the client left
      note = f"{note} (reply lost: {e})"
    logging.info(
        '%s "%s %s" %d %.1f ms %s',
        self.client_address[0],
        method,
        self.path,
        status,
        (time.perf_counter() - start) * 1e3,
        note[:200],
    )

  def log_request(self, code="-", size="-"):
    del code, size  # `_respond` writes the one line per request

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    # Requests the base class refuses itself (a bad request line, ...).
    logging.warning("%s %s", self.client_address[0], format % args)


class SearchServer(http.server.ThreadingHTTPServer):
  """A ThreadingHTTPServer whose `server_close` waits for requests in flight."""

  daemon_threads = False
  block_on_close = True
  # listen() backlog; socketserver's 5 resets connections in bursts.
  request_queue_size = 128

  def __init__(self, address: tuple[str, int], app: SearchApp):
    super().__init__(address, _Handler)
    self.app = app

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"


def serve_until_signalled(server: SearchServer) -> None:
  """Serves until SIGINT or SIGTERM, then finishes in-flight requests."""

  def stop(signum, frame):
    del frame
    logging.info("%s: shutting down", signal.Signals(signum).name)
    # shutdown() waits for serve_forever, which runs in this (main) thread.
    threading.Thread(target=server.shutdown, daemon=True).start()

  previous = {
      s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)
  }
  try:
    server.serve_forever()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    server.server_close()  # joins the request threads
    server.app.close()


def _define_flags():
  """Command-line flags; defined only when run as a script."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("export", None, "Export directory (--mode=export).")
  flags.DEFINE_string("index", None, "Index directory (serving.load_index).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
  flags.DEFINE_integer("port", 8080, "Port to bind; 0 picks a free one.")
  flags.DEFINE_string(
      "build_index_from",
      None,
      "A BEIR corpus.jsonl: embed it with the export's passage tower and "
      "write --index (which must not hold an index yet) before serving.",
  )
  flags.DEFINE_enum(
      "metric", "dot", exact_topk.METRICS, "Metric of a built index."
  )
  flags.DEFINE_integer("max_batch", 64, "Most texts per encoder call.")
  flags.DEFINE_float(
      "max_wait_ms", 5.0, "Longest wait for more queries to batch."
  )
  defaults = Limits()
  flags.DEFINE_integer(
      "max_queries", defaults.max_queries, "Most queries per request."
  )
  flags.DEFINE_integer(
      "max_query_chars", defaults.max_query_chars, "Most characters per query."
  )
  flags.DEFINE_integer(
      "max_body_bytes", defaults.max_body_bytes, "Largest request body."
  )
  flags.DEFINE_integer(
      "default_k", defaults.default_k, "k of a /search without one."
  )
  flags.mark_flags_as_required(["export", "index"])
  return flags.FLAGS


def _build_index(model: serving.ServingModel, index_dir: str, corpus: str):
  if (pathlib.Path(index_dir) / serving.INDEX_EMBEDDINGS_FILE).exists():
    raise FileExistsError(
        f"{index_dir} already holds an index; drop --build_index_from or "
        "pass an empty --index"
    )
  doc_ids, titles, texts = beir.read_corpus(corpus)
  start = time.perf_counter()
  index = serving.build_index(
      model,
      index_dir,
      doc_ids,
      [beir.doc_text(t, x) for t, x in zip(titles, texts)],
      metric=FLAGS.metric,
  )
  logging.info(
      "indexed %d documents of %s in %.1f s",
      index.num_docs,
      corpus,
      time.perf_counter() - start,
  )


def _main(argv):
  del argv
  model = serving.ServingModel.load(FLAGS.export)
  if FLAGS.build_index_from:
    _build_index(model, FLAGS.index, FLAGS.build_index_from)
  index = serving.load_index(FLAGS.index)
  app = SearchApp(
      model,
      index,
      limits=Limits(
          max_queries=FLAGS.max_queries,
          max_query_chars=FLAGS.max_query_chars,
          max_body_bytes=FLAGS.max_body_bytes,
          default_k=FLAGS.default_k,
      ),
      max_batch=FLAGS.max_batch,
      max_wait_s=FLAGS.max_wait_ms / 1e3,
  )
  app.warm_up()
  server = SearchServer((FLAGS.host, FLAGS.port), app)
  logging.info(
      "%s: %d documents (%s), %d-d, on %s",
      server.url,
      index.num_docs,
      index.metric,
      index.embedding_dim,
      model.device,
  )
  # Tests and scripts read the bound port (--port=0) from this line.
  print(f"serving on {server.url}", flush=True)
  serve_until_signalled(server)
  print("shut down", flush=True)


if __name__ == "__main__":
  from absl import app as absl_app  # pylint: disable=g-import-not-at-top

  FLAGS = _define_flags()
  absl_app.run(_main)
