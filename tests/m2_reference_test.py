"""M2Encoder against files written by the reference M2-BERT (HazyResearch/m2).

tests/fixtures/m2_reference/ holds a reference `BertModel`'s state dict
(random weights, 2 layers of width 32) and its outputs on a half-padded
batch at lengths 128 and 2048, written by experiments/parity/m2_reference.py
(which needs the reference checkout and torch; this test needs neither).
"""

import pathlib

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from experiments.parity import m2_reference
from retrieval_jax import errors
from retrieval_jax import pretrained

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "m2_reference"


def _load(length: int):
  state = safetensors.numpy.load_file(FIXTURES / f"m2_l{length}.safetensors")
  outputs = np.load(FIXTURES / f"m2_l{length}_outputs.npz")
  return state, outputs["sequence"], outputs["pooled"]


class ReferenceParityTest(parameterized.TestCase):

  @parameterized.parameters(128, 2048)
  def test_same_outputs_as_the_reference(self, length):
    state, sequence, pooled = _load(length)
    model = m2_reference.project_model(length)
    pretrained.load_m2_state_dict(model, state)
    ids, types, mask = (jnp.asarray(a) for a in m2_reference.inputs(length))
    ours = model(ids, mask, types)
    # Outputs reach about 3; float32 FFTs of length 2L differ by ~3e-6.
    np.testing.assert_allclose(ours, sequence, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        model.pool(ours, mask, "pooler"), pooled, atol=1e-5, rtol=1e-5
    )

  def test_padding_invariant_mode_differs_only_on_padded_rows(self):
    state, sequence, _ = _load(128)
    model = m2_reference.project_model(128, mask_padding=True)
    pretrained.load_m2_state_dict(model, state)
    ids, types, mask = (jnp.asarray(a) for a in m2_reference.inputs(128))
    ours = np.asarray(model(ids, mask, types))
    # Row 0 has no padding; the reference lets row 1's padding leak in.
    np.testing.assert_allclose(ours[0], sequence[0], atol=1e-5, rtol=1e-5)
    self.assertGreater(np.abs(ours[1, :64] - sequence[1, :64]).max(), 1e-3)

  def test_a_prefixed_state_dict_loads(self):
    state, sequence, _ = _load(128)
    model = m2_reference.project_model(128)
    pretrained.load_m2_state_dict(
        model, {"bert." + k: v for k, v in state.items()}
    )
    ids, types, mask = (jnp.asarray(a) for a in m2_reference.inputs(128))
    np.testing.assert_allclose(
        model(ids, mask, types), sequence, atol=1e-5, rtol=1e-5
    )

  def test_bad_state_dicts_name_the_tensor(self):
    state, _, _ = _load(128)
    missing = dict(state)
    del missing["encoder.layer.1.mlp.wo.bias"]
    extra = dict(state)
    extra["encoder.layer.0.attention.layernorm.weight"] = np.ones(32, "f4")
    cases = [
        (missing, 128, "no tensor 'encoder.layer.1.mlp.wo.bias'"),
        (extra, 128, "1 tensors .* no place for.*attention.layernorm.weight"),
        (state, 2048, "'embeddings.position_embeddings.weight' has shape"),
    ]
    for state_dict, length, regex in cases:
      with self.subTest(regex=regex):
        with self.assertRaisesRegex(errors.DataError, "^m2.st: " + regex):
          pretrained.load_m2_state_dict(
              m2_reference.project_model(length), state_dict, source="m2.st"
          )


if __name__ == "__main__":
  absltest.main()
