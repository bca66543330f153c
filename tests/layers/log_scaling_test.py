"""Log-length scaled attention against its closed form beyond the training length.

softmax_s(q_t . k_s * max(1, ln(t + 1) / ln L) / sqrt(H)) v_s, computed here in numpy from the
layer's own projection weights: the identity up to L is not enough, the factor past L is what
the method is (Chiang & Cholak 2022; Qwen's logn attention).
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import numpy as np

from longjax.defaults import default_config
from longjax.layers import attention_config

_L = 8
_T = 40  # five times the training length


def _layer(log_scaling_length: int, impl: str):
  c = default_config()
  c.model.width, c.model.num_heads, c.model.num_kv_heads = 16, 2, 1  # GQA: two heads share K/V
  c.model.posenc.kind = "nope"  # no rotation: the closed form below is the whole layer
  c.model.attention.log_scaling_length = log_scaling_length
  c.model.attention.impl = impl
  return attention_config.build(c.model, c.model.attention, nnx.Rngs(0))


def _closed_form(layer, x):
  w_q = np.asarray(layer.w_q.value, np.float64)     # [D, N, H]
  w_kv = np.asarray(layer.w_kv.value, np.float64)   # [D, 2, K, H]
  w_out = np.asarray(layer.w_out.value, np.float64)  # [N, H, D]
  x = np.asarray(x, np.float64)[0]
  q = np.einsum("td,dnh->tnh", x, w_q)
  k = np.einsum("td,dkh->tkh", x, w_kv[:, 0])[:, 0]  # the one KV head
  v = np.einsum("td,dkh->tkh", x, w_kv[:, 1])[:, 0]
  head_dim = q.shape[-1]
  out = np.zeros_like(q)
  for t in range(len(x)):
    factor = max(1.0, np.log(t + 1) / np.log(_L))
    for n in range(q.shape[1]):
      logits = q[t, n] @ k[:t + 1].T * factor / np.sqrt(head_dim)
      p = np.exp(logits - logits.max())
      out[t, n] = (p / p.sum()) @ v[:t + 1]
  return np.einsum("tnh,nhd->td", out, w_out)


class LogScalingTest(parameterized.TestCase):

  @parameterized.parameters("reference", "blockwise")
  def test_equals_the_closed_form_past_the_training_length(self, impl):
    layer = _layer(_L, impl)
    x = np.random.RandomState(0).normal(size=(1, _T, 16)).astype(np.float32) * 2.0
    positions = np.arange(_T, dtype=np.int32)[None]
    y, _ = layer(x, positions=positions)
    expected = _closed_form(layer, x)
    np.testing.assert_allclose(np.asarray(y)[0], expected, atol=2e-5, rtol=2e-5)  # float32
    # The factor matters past L, and only there: the same weights without it.
    plain = _layer(0, impl)  # nnx.Rngs(0): the same projection weights
    y_plain, _ = plain(x, positions=positions)
    np.testing.assert_allclose(np.asarray(y_plain)[0, :_L], np.asarray(y)[0, :_L], atol=1e-6)
    self.assertGreater(np.abs(np.asarray(y_plain)[0, _L:] - np.asarray(y)[0, _L:]).max(), 1e-3)


if __name__ == "__main__":
  absltest.main()
