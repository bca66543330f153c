"""The kernels suite's cases, one function per group (`longjax.benchmarks.kernels` lists them).

Each case runs in its own child process (`processes.run_case`) and returns `timing`'s measurement
plus its own figures (FLOPs, GFLOP/s, tokens/s, ...). JAX and torch are imported inside the
cases, so that a torch case's process never loads jax and a case's base RSS is its own.
"""

import functools

from longjax.benchmarks import peers
from longjax.benchmarks import flops as flops_lib
from longjax.benchmarks import timing

HEADS, HEAD_DIM, STATE = 8, 64, 16


def _keys(n):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.split(jax.random.key(0), n)


def _normal(key, shape, scale=1.0):
  import jax  # pylint: disable=g-import-not-at-top
  return scale * jax.random.normal(key, shape)


def _fwd_bwd(f):
  """(inputs..., cotangent) -> gradients of every input: one forward and one backward pass."""
  import jax  # pylint: disable=g-import-not-at-top

  def run(*args):
    _, vjp = jax.vjp(f, *args[:-1])
    return vjp(args[-1])
  return run


def _timing_kwargs(kw):
  return {"repeats": kw["repeats"], "budget_s": kw["budget_s"]}


def _torch_device(torch):
  # On a GPU machine the peer runs on the GPU as JAX does; on CPU both use the CPU. (Not
  # asking jax keeps jax out of a torch case's process and its peak RSS.)
  return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_sync(torch, device):
  return (lambda x: (torch.cuda.synchronize(), x)[1]) if device == "cuda" else (lambda x: x)


def attention_case(impl: str, t: int, **kw) -> dict:
  """Causal attention fwd+bwd at T = S = t."""
  flops = flops_lib.attention_flops(t, t, HEADS, HEAD_DIM, causal=True, backward=True)
  extra = {"flops": flops}
  if impl == "torch_sdpa":
    torch = peers.import_torch()
    device = _torch_device(torch)
    q, k, v = (torch.randn(1, HEADS, t, HEAD_DIM, device=device, requires_grad=True)
               for _ in range(3))
    do = torch.randn(1, HEADS, t, HEAD_DIM, device=device)

    def step():
      q.grad = k.grad = v.grad = None
      torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
      return q.grad
    measured = timing.time_callable(step, sync=_torch_sync(torch, device), **_timing_kwargs(kw))
    extra["torch_device"] = device
  else:
    import jax  # pylint: disable=g-import-not-at-top
    from longjax import ops  # pylint: disable=g-import-not-at-top
    if impl == "jax_nn":
      attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
      name = {"longjax_auto": "auto", "longjax_blockwise": "blockwise",
              "longjax_pallas": "pallas"}[impl]
      mask = ops.AttentionMask(causal=True)
      attn = lambda q, k, v: ops.dot_product_attention(q, k, v, mask=mask, impl=name)  # noqa
      extra["resolved"] = _pallas_label() if name == "pallas" else _resolved(name, t, t)
    keys = _keys(4)
    args = [_normal(key, (1, t, HEADS, HEAD_DIM)) for key in keys]
    measured = timing.time_jax(_fwd_bwd(attn), args, memory_budget_bytes=kw["memory_budget"],
                               **_timing_kwargs(kw))
  return {**measured, **extra, "gflops_per_s": flops / measured["time_s"] / 1e9}


def _resolved(name: str, t: int, s: int) -> str:
  """The implementation `ops.dot_product_attention(impl=name)` runs for this unbiased causal
  case (decode calls, t < s, have a traced query offset)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from longjax import ops  # pylint: disable=g-import-not-at-top
  q, k = (jax.ShapeDtypeStruct((1, n, HEADS, HEAD_DIM), jnp.float32) for n in (t, s))
  mask = ops.AttentionMask(causal=True, q_offset=jnp.int32(s - t) if t < s else 0)
  return ops.attention.resolve_call(name, q, k, mask).impl


def _pallas_label() -> str:
  import kernels_pallas  # pylint: disable=g-import-not-at-top
  return "pallas (interpret)" if kernels_pallas.default_interpret() else "pallas"


def decode_case(impl: str, cache: int, **kw) -> dict:
  """One decode step: a query token at position cache - 1 against a full cache of `cache`."""
  bytes_read = 2 * cache * HEADS * HEAD_DIM * 4  # K and V, f32
  extra = {"flops": flops_lib.attention_flops(1, cache, HEADS, HEAD_DIM, causal=True,
                                              backward=False), "cache_bytes": bytes_read}
  kw = {**kw, "repeats": 4 * kw["repeats"]}  # milliseconds per call: take more samples
  if impl == "torch_sdpa":
    torch = peers.import_torch()
    device = _torch_device(torch)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device=device)
    k, v = (torch.randn(1, HEADS, cache, HEAD_DIM, device=device) for _ in range(2))

    def step():
      with torch.inference_mode():  # a full cache: every key is visible, no mask needed
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    measured = timing.time_callable(step, sync=_torch_sync(torch, device), **_timing_kwargs(kw))
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import kernels_pallas  # pylint: disable=g-import-not-at-top
    from longjax import ops  # pylint: disable=g-import-not-at-top
    if impl == "pallas_decode":
      fn = lambda q, k, v, n: kernels_pallas.decode_attention(q, k, v, cache_length=n)  # noqa
      extra["resolved"] = _pallas_label()
    elif impl == "longjax_auto":
      def fn(q, k, v, n):  # the cache length arrives at run time, as in a decode loop
        mask = ops.AttentionMask(causal=True, q_offset=n - 1)
        return ops.dot_product_attention(q, k, v, mask=mask)
      extra["resolved"] = _resolved("auto", 1, cache)
    else:
      def fn(q, k, v, n):  # the plain definition a user writes: dense logits, masked softmax
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) * HEAD_DIM ** -0.5
        logits = jnp.where(jnp.arange(cache) < n, logits, -jnp.inf)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
    keys = _keys(3)
    args = [_normal(keys[0], (1, 1, HEADS, HEAD_DIM))]
    args += [_normal(key, (1, cache, HEADS, HEAD_DIM)) for key in keys[1:]]
    args.append(jnp.int32(cache))
    measured = timing.time_jax(fn, args, memory_budget_bytes=kw["memory_budget"],
                               **_timing_kwargs(kw))
  return {**measured, **extra, "ms_per_token": 1e3 * measured["time_s"],
          "cache_gb_per_s": bytes_read / measured["time_s"] / 1e9}


def linear_case(impl: str, t: int, **kw) -> dict:
  """Causal linear attention fwd+bwd at T = t (no decay, scale Dk^-1/2)."""
  import kernels_pallas  # pylint: disable=g-import-not-at-top
  from longjax.ops import linear_attention  # pylint: disable=g-import-not-at-top
  if impl == "chunked_jnp":  # the op the linear-attention mixers run on CPU
    fn = functools.partial(linear_attention.linear_attention, impl="chunked")
    extra = {"resolved": "longjax.ops.linear_attention chunked (XLA)"}
  elif impl == "pallas":
    fn, extra = kernels_pallas.linear_attention, {"resolved": _pallas_label()}
  else:
    fn, extra = kernels_pallas.linear_attention_recurrent, {}

  def attn(q, k, v):
    if impl == "chunked_jnp":
      return fn(q, k, v, scale=HEAD_DIM ** -0.5)[0]
    return fn(q, k, v, scale=HEAD_DIM ** -0.5, return_final_state=False)
  keys = _keys(4)
  args = [_normal(key, (1, t, HEADS, HEAD_DIM)) for key in keys]
  measured = timing.time_jax(_fwd_bwd(attn), args, memory_budget_bytes=kw["memory_budget"],
                             **_timing_kwargs(kw))
  return {**measured, **extra, "tokens_per_s": t / measured["time_s"]}


def _scan_inputs(length, d_model):
  """Mamba-like inputs: A = -(1..P) per channel (S4D-real init), dt bias ~ softplus^-1(0.01)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  keys = _keys(5)
  u, delta = (_normal(key, (1, length, d_model)) for key in keys[:2])
  b, c = (_normal(key, (1, length, STATE)) for key in keys[2:4])
  a = -jnp.broadcast_to(jnp.arange(1, STATE + 1, dtype=jnp.float32), (d_model, STATE))
  return u, delta, a, b, c, jnp.ones((d_model,)), jnp.full((d_model,), -4.6), keys[4]


def scan_case(impl: str, length: int, d_model: int, **kw) -> dict:
  """Selective scan fwd+bwd over L = length steps of D = d_model channels, P = 16."""
  if impl == "torch_loop":
    measured = _torch_scan_timing(length, d_model, kw)
  else:
    import kernels_pallas  # pylint: disable=g-import-not-at-top
    u, delta, a, b, c, d, bias, key = _scan_inputs(length, d_model)
    fn = kernels_pallas.selective_scan if impl == "pallas" else (
        kernels_pallas.selective_scan_reference)

    def scan(u, delta, a, b, c, d):
      return fn(u, delta, a, b, c, d, delta_bias=bias, return_final_state=False)
    args = [u, delta, a, b, c, d, _normal(key, u.shape)]
    measured = timing.time_jax(_fwd_bwd(scan), args, memory_budget_bytes=kw["memory_budget"],
                               **_timing_kwargs(kw))
    if impl == "pallas":
      measured["resolved"] = _pallas_label()
  return {**measured, "tokens_per_s": length / measured["time_s"]}


def _torch_scan_timing(length, d_model, kw):
  """HF `MambaMixer.slow_forward`'s scan (steps 3.b-3.c and the D skip), with autograd."""
  torch = peers.import_torch()
  device = _torch_device(torch)
  gen = torch.Generator().manual_seed(0)

  def leaf(*shape):
    return torch.randn(*shape, generator=gen).to(device).requires_grad_()
  u, delta = leaf(1, d_model, length), leaf(1, d_model, length)  # HF: [batch, channels, time]
  b, c = leaf(1, length, STATE), leaf(1, length, STATE)
  a = (-torch.arange(1, STATE + 1, dtype=torch.float32)).repeat(d_model, 1).to(device)
  a.requires_grad_()
  d_skip = torch.ones(d_model, device=device, requires_grad=True)
  bias = torch.full((d_model,), -4.6, device=device)
  dy = torch.randn(1, d_model, length, generator=gen).to(device)
  leaves = (u, delta, a, b, c, d_skip)

  def step():
    for x in leaves:
      x.grad = None
    dt = torch.nn.functional.softplus(delta + bias[None, :, None])
    discrete_a = torch.exp(a[None, :, None, :] * dt[:, :, :, None])  # [b, d, l, n]
    delta_b_u = dt[:, :, :, None] * b[:, None, :, :] * u[:, :, :, None]
    state = torch.zeros(1, d_model, STATE, device=device)
    outputs = []
    for i in range(length):
      state = discrete_a[:, :, i, :] * state + delta_b_u[:, :, i, :]
      outputs.append(torch.matmul(state, c[:, i, :].unsqueeze(-1))[:, :, 0])
    y = torch.stack(outputs, dim=-1) + u * d_skip[None, :, None]
    y.backward(dy)
    return u.grad
  return timing.time_callable(step, sync=_torch_sync(torch, device), **_timing_kwargs(kw))
