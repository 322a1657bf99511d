"""Atomic writes leave the old file or the new one; fingerprints separate."""

import hashlib
import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from retrieval_jax import io


class _Boom(Exception):
  pass


class AtomicWriteTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def test_json_round_trip(self):
    obj = {"ndcg@10": 0.5, "ids": ["q1", "é"], "nested": {"a": [1, 2]}}
    path = os.path.join(self.dir, "sub", "metrics.json")
    io.write_json_atomic(path, obj)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    self.assertEqual(json.loads(text), obj)
    self.assertIn("é", text)  # ensure_ascii=False
    self.assertTrue(text.endswith("\n"))
    self.assertEqual(os.listdir(os.path.dirname(path)), ["metrics.json"])

  def test_npy_round_trip(self):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = os.path.join(self.dir, "x.npy")
    io.save_npy_atomic(path, array)
    loaded = np.load(path)
    np.testing.assert_array_equal(loaded, array)
    self.assertEqual(loaded.dtype, np.float32)

  def test_npz_round_trip_keeps_the_exact_name(self):
    path = os.path.join(self.dir, "cache.bin")
    io.save_npz_atomic(path, a=np.arange(3), b=np.array("text"))
    self.assertEqual(os.listdir(self.dir), ["cache.bin"])
    with np.load(path) as f:
      np.testing.assert_array_equal(f["a"], np.arange(3))
      self.assertEqual(str(f["b"]), "text")

  def test_replaces_an_existing_file(self):
    path = os.path.join(self.dir, "t.txt")
    io.write_text_atomic(path, "old")
    io.write_text_atomic(path, "new")
    with open(path, encoding="utf-8") as f:
      self.assertEqual(f.read(), "new")

  def test_failure_mid_write_keeps_the_old_file_and_no_temp(self):
    path = os.path.join(self.dir, "t.bin")
    io.write_bytes_atomic(path, b"old")

    def half_then_fail(f):
      f.write(b"partial")
      raise _Boom()

    with self.assertRaises(_Boom):
      io.write_with(path, half_then_fail)
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"old")
    self.assertEqual(os.listdir(self.dir), ["t.bin"])

  def test_failure_on_a_new_path_leaves_nothing(self):
    path = os.path.join(self.dir, "new.npz")

    class Unsaveable:

      def __array__(self, *args, **kwargs):
        raise _Boom()

    with self.assertRaises(_Boom):
      io.save_npz_atomic(path, ok=np.zeros(3), bad=Unsaveable())
    self.assertEqual(os.listdir(self.dir), [])

  def test_unserialisable_json_writes_nothing(self):
    path = os.path.join(self.dir, "x.json")
    with self.assertRaises(TypeError):
      io.write_json_atomic(path, {"x": object()})
    self.assertEqual(os.listdir(self.dir), [])

  def test_file_is_readable_by_others(self):
    path = os.path.join(self.dir, "x.txt")
    io.write_text_atomic(path, "x")
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)


class FingerprintTest(parameterized.TestCase):

  def test_deterministic_sha256_hex(self):
    fp = io.fingerprint(["a", "b"], "c", np.arange(3))
    self.assertEqual(fp, io.fingerprint(["a", "b"], "c", np.arange(3)))
    self.assertLen(fp, 64)
    int(fp, 16)

  @parameterized.named_parameters(
      ("split_between_parts", ("ab", "c"), ("a", "bc")),
      ("split_inside_list", (["ab", "c"],), (["a", "bc"],)),
      ("list_vs_concatenation", (["a", "b"],), ("ab",)),
      ("nesting", ([["a"], "b"],), (["a", ["b"]],)),
      ("empty_item", (["", "a"],), (["a", ""],)),
      ("str_vs_bytes", ("1",), (b"1",)),
      ("array_dtype", (np.zeros(2, np.float32),), (np.zeros(2, np.int32),)),
      ("array_shape", (np.zeros((2, 3)),), (np.zeros((3, 2)),)),
      ("array_vs_bytes", (np.zeros(2, np.uint8),), (b"\0\0",)),
  )
  def test_separates(self, parts_a, parts_b):
    self.assertNotEqual(io.fingerprint(*parts_a), io.fingerprint(*parts_b))

  def test_order_matters_for_parts_and_items(self):
    self.assertNotEqual(io.fingerprint("a", "b"), io.fingerprint("b", "a"))
    self.assertNotEqual(io.fingerprint(["a", "b"]), io.fingerprint(["b", "a"]))
    self.assertNotEqual(
        io.fingerprint(np.array([1, 2])), io.fingerprint(np.array([2, 1]))
    )

  def test_sets_ignore_order_and_tuples_equal_lists(self):
    self.assertEqual(
        io.fingerprint({"a", "b", "c"}),
        io.fingerprint(frozenset(["c", "a", "b"])),
    )
    self.assertEqual(
        io.fingerprint(("a", ("b",))), io.fingerprint(["a", ["b"]])
    )

  def test_non_contiguous_array_equals_its_copy(self):
    array = np.arange(12).reshape(3, 4)
    self.assertEqual(io.fingerprint(array.T), io.fingerprint(array.T.copy()))

  def test_file_sha256_is_sha256sum(self):
    path = os.path.join(self.create_tempdir().full_path, "big")
    data = bytes(range(256)) * 9000  # Over two read chunks.
    io.write_bytes_atomic(path, data)
    self.assertEqual(io.file_sha256(path), hashlib.sha256(data).hexdigest())

  def test_rejects_numbers(self):
    with self.assertRaisesRegex(TypeError, "got int"):
      io.fingerprint(["a", 1])


if __name__ == "__main__":
  absltest.main()
