"""Encoder models, chosen by name in config through `MODELS`.

Each entry maps a config name to the module's constructor, called as
`MODELS[name](config, rngs=rngs)`.
"""

from retrieval_jax.models import m2_encoder
from retrieval_jax.models import transformer_encoder

MODELS = {
    "bert": transformer_encoder.TransformerEncoder,
    "m2": m2_encoder.M2Encoder,
}
