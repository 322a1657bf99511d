"""M2-BERT parity with the reference PyTorch code (HazyResearch/m2).

Test-only: builds the reference `BertModel` (its `bert/` directory, passed
with --reference; nothing of it is copied here) at lengths 128 and 2048 with
every parameter re-drawn at random (the reference deep-copies one layer, so
its layers start identical), writes its state dict and its outputs on a
padded batch to --out, loads the state dict into `M2Encoder` through
`pretrained.load_m2_state_dict` and prints the largest differences.
tests/m2_reference_test.py checks the written files in the default suite.

  git clone https://github.com/HazyResearch/m2 /tmp/m2
  pip install einops opt-einsum transformers   # the reference's imports
  python -m experiments.parity.m2_reference --reference /tmp/m2/bert \
      --out tests/fixtures/m2_reference

The reference runs on CPU with use_flash_fft=False and use_flash_mm=False
(both CUDA-only); its optional FlashFFTConv / triton imports fail softly.
"""

import argparse
import json
import pathlib
import sys
import types

from flax import nnx
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from retrieval_jax import pretrained
from retrieval_jax.models import m2_encoder

# A small model: 2 layers of width 32, 4 Monarch blocks, filter order 16.
SIZES = dict(
    vocab=100, hidden=32, intermediate=64, layers=2, blocks=4, order=16
)
LENGTHS = (128, 2048)


def _import_reference(bert_dir: pathlib.Path):
  """The reference's bert_layers and configuration_bert modules, without its
  training package (`src/__init__.py` imports composer)."""
  sys.path[:0] = [str(bert_dir), str(bert_dir / "src")]
  package = types.ModuleType("src")
  package.__path__ = [str(bert_dir / "src")]
  sys.modules["src"] = package
  import bert_layers  # pylint: disable=g-import-not-at-top
  import configuration_bert  # pylint: disable=g-import-not-at-top

  return bert_layers, configuration_bert


def _reference_model(bert_layers, configuration_bert, length: int):
  import torch  # pylint: disable=g-import-not-at-top

  s = SIZES
  config = configuration_bert.BertConfig(
      vocab_size=s["vocab"],
      hidden_size=s["hidden"],
      num_hidden_layers=s["layers"],
      num_attention_heads=1,
      intermediate_size=s["intermediate"],
      max_position_embeddings=length,
      type_vocab_size=2,
      hidden_dropout_prob=0.0,
      layer_norm_eps=1e-12,
      pad_token_id=0,
      monarch_mixer_sequence_mixing=True,
      long_conv_l_max=length,
      long_conv_kernel_learning_rate=1e-3,
      hyena_lr_pos_emb=1e-5,
      hyena_w=10,
      hyena_w_mod=1,
      hyena_wd=0.1,
      hyena_emb_dim=5,
      hyena_filter_order=s["order"],
      hyena_filter_dropout=0.0,
      hyena_training_additions=False,
      bidirectional=True,
      residual_long_conv=True,
      use_glu_mlp=True,
      use_monarch_mlp=True,
      monarch_mlp_nblocks=s["blocks"],
      use_positional_encodings=True,
      use_flash_mm=False,
      use_flash_fft=False,
      pool_all=False,
      use_cls_token=True,
      sequence_token_planting=False,
  )
  torch.manual_seed(length)
  model = bert_layers.BertModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("pos_emb.z"):
        continue  # the Fourier features the filters are a function of
      if name.endswith("freq"):
        p.fill_(10.0)
      elif "LayerNorm" in name or "layernorm" in name:
        if name.endswith("weight"):
          p.copy_(1 + 0.1 * torch.randn_like(p))
        else:
          p.normal_(0, 0.1)
      else:
        # Larger filter-MLP weights make its sines amplify float32 rounding.
        p.normal_(0, 0.1)
  return model


def project_model(length: int, *, mask_padding: bool = False):
  """The M2Encoder of the same shape (reference behaviour: no masking)."""
  s = SIZES
  config = m2_encoder.M2Config(
      vocab_size=s["vocab"],
      hidden_size=s["hidden"],
      num_layers=s["layers"],
      intermediate_size=s["intermediate"],
      max_position_embeddings=length,
      monarch_blocks=s["blocks"],
      filter_order=s["order"],
      hidden_dropout=0.0,
      mask_padding=mask_padding,
  )
  return m2_encoder.M2Encoder(config, rngs=nnx.Rngs(0))


def inputs(length: int):
  """Two rows of random ids and token types; the second half padding."""
  rng = np.random.default_rng(length)
  ids = rng.integers(1, SIZES["vocab"], (2, length))
  types_ = rng.integers(0, 2, (2, length))
  mask = np.ones((2, length), np.int64)
  mask[1, length // 2 :] = 0
  return ids, types_, mask


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference", type=pathlib.Path, required=True)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top

  bert_layers, configuration_bert = _import_reference(args.reference)
  args.out.mkdir(parents=True, exist_ok=True)
  for length in LENGTHS:
    reference = _reference_model(bert_layers, configuration_bert, length)
    # Copies: the reference's filters share one frequency tensor.
    state = {
        k: v.detach().numpy().copy() for k, v in reference.state_dict().items()
    }
    ids, types_, mask = inputs(length)
    with torch.no_grad():
      sequence, pooled = reference(
          torch.tensor(ids),
          token_type_ids=torch.tensor(types_),
          attention_mask=torch.tensor(mask),
      )
    assert pooled is not None  # the reference returns None on a pooler error
    weights = args.out / f"m2_l{length}.safetensors"
    safetensors.numpy.save_file(state, weights)
    np.savez(
        args.out / f"m2_l{length}_outputs.npz",
        sequence=sequence.numpy(),
        pooled=pooled.numpy(),
    )
    model = project_model(length)
    pretrained.load_m2_state_dict(model, state, source=str(weights))
    ours = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types_))
    ours_pooled = model.pool(ours, jnp.asarray(mask), "pooler")
    report = {
        "length": length,
        "sequence_max_abs_diff": float(np.abs(ours - sequence.numpy()).max()),
        "sequence_max_abs": float(np.abs(sequence.numpy()).max()),
        "pooled_max_abs_diff": float(
            np.abs(ours_pooled - pooled.numpy()).max()
        ),
    }
    print(json.dumps(report))


if __name__ == "__main__":
  main()
