"""Generate text from a trained run with the KV cache.

  python -m experiments.sample --workdir=runs/quickstart --prompt="def main(" \
      --max_new_tokens=200 [--temperature=0.8 --top_k=40 --seed=0]
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config (default: the run's saved config, configs/saved_run.py:WORKDIR).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
_PROMPT = flags.DEFINE_string("prompt", "import ", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Independent samples of the same prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  if _MAX_NEW.value < 1 or _TEMPERATURE.value < 0 or _TOP_K.value < 0 or _NUM.value < 1:
    common.fail("need --max_new_tokens >= 1, --temperature >= 0, --top_k >= 0, "
                "--num_samples >= 1")
  import jax  # pylint: disable=g-import-not-at-top (fast --help)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from longjax.models import generate as generate_lib  # pylint: disable=g-import-not-at-top
  run = common.load_run_or_fail(_WORKDIR.value, _CONFIG.value)
  tok = run.corpus.tokenizer
  prompt = np.concatenate([[tok.bos_id], tok.encode(_PROMPT.value)]).astype(np.int32)
  prompt = np.tile(prompt[None], (_NUM.value, 1))
  need = generate_lib.cache_bytes(run.graphdef, run.params, _NUM.value,
                                  prompt.shape[1] + _MAX_NEW.value)
  have = common.memory_bytes()
  if need > have // 2:
    common.fail(f"--max_new_tokens={_MAX_NEW.value} needs a {need / 2**30:.1f} GiB decode cache "
                f"for {_NUM.value} sample(s), more than half of this device's "
                f"{have / 2**30:.1f} GiB; lower --max_new_tokens or --num_samples")
  out = generate_lib.generate(run.graphdef, run.params, prompt, jax.random.key(_SEED.value),
                              max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                              top_k=_TOP_K.value)
  for i, row in enumerate(np.asarray(out)):
    ends = np.flatnonzero(row[prompt.shape[1]:] == tok.eos_id)
    if ends.size:  # the document ended: what follows would be the start of another
      row = row[:prompt.shape[1] + ends[0]]
    print(f"--- sample {i} (step {run.step}) ---")
    print(tok.decode(row))


if __name__ == "__main__":
  sys.argv = common.default_to_saved_config(sys.argv)
  common.run(main)
