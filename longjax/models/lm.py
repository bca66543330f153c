"""DecoderLM: embed -> scanned, rematerialised blocks -> norm -> logits, with a cache API."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from longjax.layers import mixer as mixer_lib
from longjax.layers import params
from longjax.layers.blocks import Block
from longjax.layers.norms import RMSNorm
from longjax.layers.positional import POSENCS
from longjax.models import registry
from longjax.ops import landmarks

# config.model.remat -> jax.checkpoint policy. "none" keeps every activation (fastest, most
# memory); "full" keeps only each layer's input; the "dots" policies keep matmul outputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLM(nnx.Module):
  """A decoder-only language model whose layers follow the pattern `cfg.mixers`.

  The pattern (e.g. "attention", "attention(window=256),attention" or later
  "attention,attention,mamba"; `longjax.layers.mixer`) is one *group* of layers;
  the group is stacked `num_layers / len(pattern)` times with `nnx.vmap`. With
  `cfg.scan_layers` the groups are applied with `jax.lax.scan`, so compile time does not grow
  with depth; otherwise in a Python loop over static parameter slices (see `__call__`).
  """

  def __init__(self, cfg, *, vocab_size: int, rngs: nnx.Rngs):
    pattern = registry.parse_mixers(cfg.mixers, cfg)
    if cfg.num_layers % len(pattern):
      raise ValueError(f"model.num_layers={cfg.num_layers} is not a multiple of the "
                       f"{len(pattern)}-layer pattern model.mixers={cfg.mixers!r}")
    self.dtype = registry.DTYPES[cfg.dtype]
    self.remat = cfg.remat
    self.scan_layers = cfg.scan_layers
    self.num_groups = cfg.num_layers // len(pattern)
    self.embed = params.param(rngs, params.normal(cfg.width**-0.5), (vocab_size, cfg.width),
                              (params.VOCAB, params.EMBED))
    # Landmark layers (`longjax.layers.landmark`) need a landmark after every block_size - 1
    # tokens: one learned input vector, inserted after embedding and dropped before the logits.
    self.landmark_block = mixer_lib.landmark_block(pattern, cfg)
    if self.landmark_block:
      self.landmark_embed = params.param(rngs, params.normal(cfg.width**-0.5), (cfg.width,),
                                         (params.EMBED,))
    # Layers that evaluate as they decode (landmark attention, retrieval policies: each token
    # sees what a cache would give it) make `training.step.token_losses` evaluate through one.
    self.evaluates_with_cache = any(
        entry.spec.evaluates_with_cache is not None
        and entry.spec.evaluates_with_cache(entry.config(cfg)) for entry in pattern)
    make_input_positions = POSENCS[cfg.posenc.kind].input
    self.input_positions = make_input_positions(cfg, rngs) if make_input_positions else None

    def make_group(rngs):
      return nnx.List([
          Block(entry.spec.build(cfg, entry.config(cfg), rngs), cfg.width, cfg.mlp_hidden,
                out_init_scale=registry.out_init_scale(cfg), dtype=self.dtype, rngs=rngs)
          for entry in pattern])

    make_groups = nnx.split_rngs(splits=self.num_groups)(
        nnx.vmap(make_group, in_axes=0, out_axes=0,
                 transform_metadata={nnx.PARTITION_NAME: params.LAYERS}))
    self.groups = make_groups(rngs)
    self.final_norm = RMSNorm(cfg.width, dtype=self.dtype, rngs=rngs)
    self.head = None if cfg.tie_embeddings else params.param(
        rngs, params.fan_in_init(in_axis=0, out_axis=1), (cfg.width, vocab_size),
        (params.EMBED, params.VOCAB))

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    """One cache per layer, in layer order: a tuple of `num_layers` mixer caches.

    Separate buffers per layer rather than one stacked [layers, ...] array: decoding then
    writes each layer's new keys and values into its own buffer in place. A stacked cache
    passed through the layer scan is sliced out (a copy) and stacked back (another copy) at
    every call, i.e. the whole cache copied per decoded token (measured: 77 ms/token at a 4k
    context for a d512 8-layer model, docs/benchmarks.md).

    `max_length` counts tokens; with landmark layers the caches also hold the landmarks, and one
    more slot for the landmark a decode step runs and then forgets (`_landmark_layers`).
    """
    if self.landmark_block:
      max_length = landmarks.landmarked_length(max_length, self.landmark_block) + 1
    caches = []
    for group in range(self.num_groups):
      for i, block in enumerate(self.groups):
        cache = block.mixer.init_cache(batch_size, max_length, dtype)
        if hasattr(block.mixer, "layer_cache"):  # a cache that depends on the layer's index
          cache = block.mixer.layer_cache(cache, group * len(self.groups) + i)
        caches.append(cache)
    return tuple(caches)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache=None):
    """Logits for every position.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] int32; defaults to 0..T-1 (or, with a cache, continuing from its end).
      segment_ids: [B, T] int32 document ids of a packed batch (training/evaluation only).
      cache: from `init_cache` or a previous call; None for training.

    Returns:
      (logits [B, T, V] float32, the updated cache or None).
    """
    batch, length = tokens.shape
    if positions is None:
      start = 0 if cache is None else cache[0].end  # every mixer cache has `end`
      if self.landmark_block:  # the caches count landmarks too; positions count tokens
        start = landmarks.regular_length(start, self.landmark_block)
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = jnp.take(self.embed.value, tokens, axis=0)
    if self.landmark_block:
      x, cache = self._landmark_layers(x, positions, segment_ids, cache)
    else:
      x, cache = self._layers(self._input_positions(x, positions), positions, segment_ids, cache)
    return self._logits(x), cache

  def _input_positions(self, x, positions):
    return x if self.input_positions is None else self.input_positions(x, positions)

  def _landmark_layers(self, x, positions, segment_ids, cache):
    """`_layers` on the sequence with landmarks inserted, returning the regular tokens' outputs.

    Without a cache, or with one at a block boundary (a prefill), the landmarks are inserted
    after every block_size - 1 tokens. A one-token decode step that completes a block also runs
    the block's landmark, as a second position, so that later steps can retrieve the block.
    """
    block, length = self.landmark_block, x.shape[1]
    if cache is not None and length == 1:
      completes = cache[0].end % block == block - 2
      pos = landmarks.landmarked_length(positions, block)  # the token's landmarked index

      def token_only(cache):
        return self._layers(self._input_positions(x, pos), pos, None, cache)

      def with_landmark(cache):
        both = jnp.concatenate(
            [x, jnp.broadcast_to(self.landmark_embed.value.astype(x.dtype), x.shape)], axis=1)
        both_pos = jnp.concatenate([pos, pos + 1], axis=1)
        y, cache = self._layers(self._input_positions(both, both_pos), both_pos, None, cache)
        return y[:, :1], cache

      if all(getattr(c, "rewindable", False) for c in cache):
        # Every step runs the token and a landmark, and a landmark that completes no block is
        # forgotten by setting `end` back. A lax.cond between a one- and a two-position step
        # makes XLA copy every cache buffer it updates, per step: 114 vs 26 ms/token at a 16k
        # cache (d512 L8). Caches that cannot forget (recurrent states) take the cond.
        y, cache = with_landmark(cache)
        return y, tuple(dataclasses.replace(c, end=jnp.where(completes, c.end, c.end - 1))
                        for c in cache)
      return jax.lax.cond(completes, with_landmark, token_only, cache)
    lm_positions, lm_segments = landmarks.landmark_layout(positions, segment_ids, block)
    y = landmarks.insert_landmarks(x, self.landmark_embed.value.astype(x.dtype), block)
    y, new_cache = self._layers(self._input_positions(y, lm_positions), lm_positions,
                                lm_segments, cache)
    y = landmarks.remove_landmarks(y, block, length)
    if cache is not None:
      # A multi-token call inserts landmarks as from a block start; anywhere else the result
      # would be wrong, so it is NaN rather than silently off.
      y = jnp.where(cache[0].end % block == 0, y, jnp.nan)
    return y, new_cache

  def _layers(self, x, positions, segment_ids, cache):
    """The layer stack: x [B, T, D] -> (x [B, T, D], cache)."""
    graphdef, group_state = nnx.split(self.groups)

    def apply_group(x, state_and_cache):
      state, group_cache = state_and_cache
      group = nnx.merge(graphdef, state)
      new_cache = []
      for i, block in enumerate(group):
        x, c = block(x, positions=positions, segment_ids=segment_ids,
                     cache=None if group_cache is None else group_cache[i])
        new_cache.append(c)
      return x, (None if group_cache is None else tuple(new_cache))

    if self.remat != "none":
      apply_group = jax.checkpoint(apply_group, policy=REMAT_POLICIES[self.remat],
                                   prevent_cse=False)
    if cache is None and self.scan_layers:
      x, _ = jax.lax.scan(apply_group, x, (group_state, None))
    else:
      # Unrolled: static parameter slices, compile time linear in depth. Prefill and decode
      # always run this way, each layer with its own cache buffer (see `init_cache`). Training
      # without the scan saves each layer's activations where they are computed; the scan
      # copies every one into a [groups, ...] stack for the backward pass (XLA cannot write
      # a library matmul's output into a slice in place): d512 L8 T1024 step 3.25 -> 3.08 s,
      # compiled temporaries 2020 -> 1670 MiB, compile 1.5 -> 2.1 s (8 layers; 5.8 s at 32).
      per_group = len(self.groups)
      new_cache = []
      for g in range(self.num_groups):
        state = jax.tree.map(lambda a, g=g: a[g], group_state)
        group_cache = None if cache is None else cache[g * per_group:(g + 1) * per_group]
        x, group_cache = apply_group(x, (state, group_cache))
        if cache is not None:
          new_cache.extend(group_cache)
      if cache is not None:
        cache = tuple(new_cache)

    return x, cache

  def _logits(self, x):
    x = self.final_norm(x)
    if self.head is None:
      logits = jnp.einsum("btd,vd->btv", x, self.embed.value.astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.head.value.astype(self.dtype),
                          preferred_element_type=jnp.float32)
    return logits
