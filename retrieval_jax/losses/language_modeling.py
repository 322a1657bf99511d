"""Next-token prediction (the causal LM objective Revela trains through)."""

import jax
import jax.numpy as jnp


def next_token_loss(logits_blv, ids_bl, mask_bl):
  """Mean cross-entropy of token t+1 given positions <= t -> (loss, aux).

  Args:
    logits_blv: float [B, L, V]; position t predicts ids_bl[:, t + 1].
    ids_bl: int [B, L] the inputs, which are also the targets.
    mask_bl: int/bool [B, L], 1 on real tokens: target t + 1 counts iff it
      is real (the last position predicts nothing).

  Returns:
    loss: float32 [], summed over real targets / their number (>= 1);
    aux: "token_accuracy" (argmax == target, same average), "tokens".
  """
  logits_blv = logits_blv[:, :-1].astype(jnp.float32)
  target_bl = ids_bl[:, 1:]
  valid_bl = mask_bl[:, 1:].astype(jnp.float32)
  logp_blv = jax.nn.log_softmax(logits_blv, axis=-1)
  nll_bl = -jnp.take_along_axis(logp_blv, target_bl[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid_bl)
  denominator = jnp.maximum(count, 1.0)
  hit_bl = (jnp.argmax(logits_blv, axis=-1) == target_bl).astype(jnp.float32)
  return jnp.sum(nll_bl * valid_bl) / denominator, {
      "token_accuracy": jnp.sum(hit_bl * valid_bl) / denominator,
      "tokens": count,
  }
