"""Hub ids resolve from the local Hugging Face cache, never the network.

A fake cache (models--{org}--{name}/refs + snapshots/<commit>/ of symlinks
to blobs, as `huggingface_hub` lays it out) is built from the packaged
all-MiniLM-L6-v2 files.
"""

import os
import pathlib
from unittest import mock

from absl.testing import absltest
from flax import nnx
import numpy as np

from retrieval_jax import pretrained

_ID = "test-org/MiniLM-copy"
_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _flat_params(model) -> dict:
  return {
      path: np.asarray(v[...])
      for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def _fake_cache(
    root: pathlib.Path,
    source: pathlib.Path,
    repo_id: str,
    commits=(_COMMIT,),
    ref: str | None = _COMMIT,
) -> pathlib.Path:
  """A hub cache under `root` holding `source`'s files as `repo_id`."""
  repo = root / ("models--" + repo_id.replace("/", "--"))
  blobs = repo / "blobs"
  blobs.mkdir(parents=True, exist_ok=True)
  for commit in commits:
    snapshot = repo / "snapshots" / commit
    for path in source.rglob("*"):
      if path.is_dir():
        continue
      relative = path.relative_to(source)
      blob = blobs / (str(relative).replace("/", "_") + ".blob")
      if not blob.exists():
        blob.symlink_to(path)
      link = snapshot / relative
      link.parent.mkdir(parents=True, exist_ok=True)
      link.symlink_to(os.path.relpath(blob, link.parent))
  if ref is not None:
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(ref)
  return repo


class HubCacheTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      cls.source = pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(self.create_tempdir().full_path)
    # No relative directory of the id's name may exist in the cwd.
    cwd = os.getcwd()
    os.chdir(self.create_tempdir().full_path)
    self.addCleanup(os.chdir, cwd)

  def _env(self, **env):
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
    }
    return mock.patch.dict(os.environ, dict(clean, **env), clear=True)

  def test_hub_id_loads_the_same_params_as_the_directory(self):
    hub = self.root / "hub"
    _fake_cache(hub, self.source, _ID)
    with self._env(HF_HUB_CACHE=str(hub)):
      by_id = pretrained.load_pretrained(_ID)
    self.assertEqual(
        by_id.model_dir,
        (hub / f"models--test-org--MiniLM-copy/snapshots/{_COMMIT}").resolve(),
    )
    by_dir = pretrained.load_pretrained(self.source)
    ours, theirs = _flat_params(by_id.model), _flat_params(by_dir.model)
    self.assertEqual(set(ours), set(theirs))
    for path, value in ours.items():
      np.testing.assert_array_equal(value, theirs[path], err_msg=str(path))
    self.assertEqual(
        (by_id.pooling, by_id.normalize, by_id.max_length),
        (by_dir.pooling, by_dir.normalize, by_dir.max_length),
    )

  def test_layout_agrees_with_huggingface_hub(self):
    try:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      self.skipTest(f"needs huggingface_hub: {e}")
    hub = self.root / "hub"
    _fake_cache(hub, self.source, _ID)
    theirs = huggingface_hub.try_to_load_from_cache(
        _ID, "config.json", cache_dir=hub
    )
    with self._env(HF_HUB_CACHE=str(hub)):
      ours = pretrained.resolve_model_dir(_ID)
    self.assertEqual(pathlib.Path(theirs).parent.resolve(), ours)

  def test_hf_home_and_single_snapshot_without_refs(self):
    home = self.root / "hf_home"
    _fake_cache(home / "hub", self.source, _ID, ref=None)
    with self._env(HF_HOME=str(home)):
      self.assertEqual(pretrained.resolve_model_dir(_ID).name, _COMMIT)
    # XDG_CACHE_HOME/huggingface/hub, as huggingface_hub falls back.
    xdg = self.root / "xdg"
    _fake_cache(xdg / "huggingface" / "hub", self.source, _ID)
    with self._env(XDG_CACHE_HOME=str(xdg)):
      self.assertEqual(pretrained.resolve_model_dir(_ID).name, _COMMIT)

  def test_refs_main_picks_among_snapshots(self):
    hub = self.root / "hub"
    other = "f" * 40
    _fake_cache(hub, self.source, _ID, commits=(_COMMIT, other), ref=other)
    with self._env(HF_HUB_CACHE=str(hub)):
      self.assertEqual(pretrained.resolve_model_dir(_ID).name, other)

  def test_ambiguous_snapshots_are_an_error(self):
    hub = self.root / "hub"
    other = "f" * 40
    _fake_cache(hub, self.source, _ID, commits=(_COMMIT, other), ref=None)
    with self._env(HF_HUB_CACHE=str(hub)):
      with self.assertRaisesRegex(FileNotFoundError, "no refs/main and 2"):
        pretrained.resolve_model_dir(_ID)

  def test_absent_id_lists_where_it_looked(self):
    hub = self.root / "empty_hub"
    with self._env(HF_HUB_CACHE=str(hub)):
      with self.assertRaises(FileNotFoundError) as ctx:
        pretrained.resolve_model_dir("some-org/missing-model")
    message = str(ctx.exception)
    self.assertIn(str(hub / "models--some-org--missing-model"), message)
    self.assertIn("does not exist", message)  # The directory reading.
    self.assertIn("huggingface-cli download", message)
    # An absolute path is not a hub id: no cache lookup for it.
    with self._env(HF_HUB_CACHE=str(hub)):
      with self.assertRaises(FileNotFoundError) as ctx:
        pretrained.resolve_model_dir(self.root / "nope")
    self.assertNotIn("models--", str(ctx.exception))

  def test_local_directory_wins_over_the_cache(self):
    hub = self.root / "hub"
    _fake_cache(hub, self.source, _ID)
    local = pathlib.Path(os.getcwd()) / _ID
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    with self._env(HF_HUB_CACHE=str(hub)):
      self.assertEqual(pretrained.resolve_model_dir(_ID), local.resolve())


if __name__ == "__main__":
  absltest.main()
