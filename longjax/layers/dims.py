"""Sizes and dtypes derived from `config.model`, shared by the model and its mixers."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def head_dim(cfg) -> int:
  """H: `model.head_dim`, or width / heads when it is 0."""
  return cfg.head_dim or cfg.width // cfg.num_heads


def num_kv_heads(cfg) -> int:
  """K: `model.num_kv_heads`, or the query heads (MHA) when it is 0."""
  return cfg.num_kv_heads or cfg.num_heads


def out_init_scale(cfg) -> float:
  # Residual-branch outputs start 1/sqrt(2L) smaller (GPT-2), so the residual stream's variance
  # at initialisation does not grow with depth.
  return 1.0 / (2.0 * cfg.num_layers)
