"""Autoregressive decoding with the KV cache: greedy, temperature and top-k sampling."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float,
                  top_k: int) -> jax.Array:
  """Picks one token per row.

  Args:
    logits: [B, V] float32.
    rng: a PRNG key (unused when greedy).
    temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: if > 0, sample only among the k most likely tokens.

  Returns:
    [B] int32 token ids.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def cache_bytes(graphdef, params, batch_size: int, max_length: int) -> int:
  """Bytes of the decode cache `generate` allocates for `batch_size` rows of `max_length`
  tokens (computed from shapes alone, nothing is allocated)."""
  cache = jax.eval_shape(lambda p: nnx.merge(graphdef, p).init_cache(batch_size, max_length),
                         params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k"))
def generate(graphdef, params, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """Continues `prompt` by `max_new_tokens` tokens.

  The prompt is processed in one prefill call that fills the cache; each new token is then one
  decode call of length 1 inside a `lax.scan`, so the whole generation is one compiled program.

  Args:
    graphdef, params: the model (`nnx.split`).
    prompt: [B, P] int32; every row has the same length (no padding).
    rng: PRNG key.
    max_new_tokens: number of tokens to add (>= 1).
    temperature, top_k: see `sample_logits`.

  Returns:
    [B, P + max_new_tokens] int32: the prompt followed by the generated tokens.
  """
  model = nnx.merge(graphdef, params)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
  logits, cache = model(prompt, positions=positions, cache=cache)
  rng, key = jax.random.split(rng)
  first = sample_logits(logits[:, -1], key, temperature=temperature, top_k=top_k)

  def decode_one(carry, step):
    cache, token, rng = carry
    rng, key = jax.random.split(rng)
    pos = jnp.full((batch, 1), prompt_len + step, jnp.int32)
    logits, cache = model(token[:, None], positions=pos, cache=cache)
    nxt = sample_logits(logits[:, -1], key, temperature=temperature, top_k=top_k)
    return (cache, nxt, rng), token

  (_, last, _), tokens = jax.lax.scan(decode_one, (cache, first, rng),
                                      jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
  generated = jnp.concatenate([tokens.T, last[:, None]], axis=1)
  return jnp.concatenate([prompt, generated], axis=1)
