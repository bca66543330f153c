"""The machine's matmul peak, measured like any other case (in child processes)."""

from longjax.benchmarks import peers
from longjax.benchmarks import processes
from longjax.benchmarks import timing
from longjax.benchmarks.progress import progress


PEAK_SIZES = {"tiny": 1024, "small": 2048, "full": 4096}


def matmul_case(dtype: str, n: int, repeats: int = 5, framework: str = "jax") -> dict:
  """GFLOP/s of an [n, n] x [n, n] matmul: jitted JAX in `dtype`, or PyTorch (f32)."""
  flops = 2 * n**3
  if framework == "torch":
    torch = peers.import_torch()
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    result = timing.time_callable(lambda: a @ b, repeats=repeats, budget_s=30)
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    result = timing.time_jax(lambda x, y: x @ y, (a, b), repeats=repeats, budget_s=30,
                             memory_budget_bytes=None)
  return {**result, "n": n, "dtype": dtype, "flops": flops,
          "gflops_per_s": flops / result["time_s"] / 1e9}


def measure_peak(sizes: str, *, timeout_s: float, include_torch: bool = True) -> dict:
  """Matmul GFLOP/s in child processes: JAX f32, JAX bf16 and, as a reference, PyTorch f32."""
  n = PEAK_SIZES[sizes]
  runs = {"f32": ("float32", "jax"), "bf16": ("bfloat16", "jax")}
  if include_torch:
    runs["torch_f32"] = ("float32", "torch")
  peak = {}
  for name, (dtype, framework) in progress(runs.items(), desc="peak"):
    env = peers.torch_env() if framework == "torch" else None
    peak[name] = processes.run_case(__name__, "matmul_case",
                                    {"dtype": dtype, "n": n, "framework": framework},
                                    timeout_s=timeout_s, preload=(framework,), env=env)
  return peak


def peak_gflops(peak: dict) -> float | None:
  """The f32 ceiling used for utilisation columns: the jitted JAX f32 matmul's GFLOP/s."""
  f32 = peak.get("f32", {})
  return f32.get("gflops_per_s") if f32.get("status") == "ok" else None
