"""JPQ's trainable parts: a query encoder and PQ centroid embeddings.

JPQ (Zhan et al. 2021) keeps each document's PQ code fixed and trains the
query encoder with the M × K centroid table. The table's starting value
comes from k-means on the corpus, known only after the module is built, so
the module holds an offset: centroids = init + scale · offset, with init
passed in (`centroids`) and the offset a zero-initialised parameter. Under
Adam the offset's steps are about the learning rate whatever the gradient's
size, so `scale` multiplies the centroids' effective learning rate (JPQ
trains them at their own rate). Calling the module runs the encoder, so it
serves wherever an encoder does (text encoders, negative mining).
"""

import jax
import jax.numpy as jnp
from flax import nnx


class JpqQueryEncoder(nnx.Module):
  """`encoder` plus a float32 [M, K, S] centroid offset (zeros at init).

  Attributes:
    encoder: the query encoder (`TransformerEncoder`).
    centroid_offset_mks: nnx.Param, trained.
    centroid_scale: float, the offset's weight (static).
  """

  def __init__(
      self,
      encoder: nnx.Module,
      *,
      num_subspaces: int,
      num_centroids: int,
      sub_dim: int,
      centroid_scale: float = 1.0,
  ):
    self.encoder = encoder
    self.centroid_offset_mks = nnx.Param(
        jnp.zeros((num_subspaces, num_centroids, sub_dim), jnp.float32)
    )
    self.centroid_scale = float(centroid_scale)

  def __call__(self, *args, **kwargs):
    """The encoder's forward pass (hidden states)."""
    return self.encoder(*args, **kwargs)

  def centroids(self, init_mks: jax.Array) -> jax.Array:
    """float32 [M, K, S] centroids = init + scale · offset."""
    return init_mks + self.centroid_scale * self.centroid_offset_mks[...]
