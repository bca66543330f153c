"""`synthetic_task`: a TFDS builder writing a synthetic task's examples as array_record.

The examples are generated locally and deterministically: example i of split s is drawn from
`tasks.example_rng(task.seed, s, i)` with a size uniform over `task.train_sizes` (and, for the
retrieval tasks, a depth uniform in [0, 1]), so a rebuild writes the same bytes. The config name
hashes everything that shapes the examples, so two task configs never share a directory.

Records: `tokens` int32 [n], `scored` bool [n] (the answer), `size` and `depth`. Reading needs
no TensorFlow (`builder.as_data_source(split)`); the longest example's token count is in
`builder.info.metadata['max_tokens']`, so a run can refuse a `data.seq_len` too short for
its examples before training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from longjax.data import tasks as tasks_lib
from longjax.data.builders import text_dir

_SPLITS = {'train': 0, 'validation': 1}  # the example streams (the harness uses 2 and up)


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticTaskConfig(tfds.core.BuilderConfig):
  task: str = ''
  params_json: str = '{}'      # the task's own section, as JSON
  train_sizes: str = ''
  num_train: int = 0
  num_validation: int = 0
  seed: int = 0


def make_config(task_cfg) -> SyntheticTaskConfig:
  """The builder config of `config.task`, named '<task>_<10-hex hash of what shapes it>'."""
  spec = tasks_lib.get(task_cfg.name)
  fields = dict(task=spec.name, params_json=json.dumps(task_cfg[spec.name].to_dict(),
                                                       sort_keys=True),
                train_sizes=str(task_cfg.train_sizes), num_train=int(task_cfg.num_train),
                num_validation=int(task_cfg.num_validation), seed=int(task_cfg.seed))
  digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
  return SyntheticTaskConfig(name=f'{spec.name}_{digest}',
                             description=f'{spec.name}: {spec.description}', **fields)


def generate(config: SyntheticTaskConfig, split: str):
  """Yields the split's examples (`tasks.Example`) in order."""
  spec = tasks_lib.get(config.task)
  params = ml_collections.ConfigDict(json.loads(config.params_json))
  sizes = tasks_lib.parse_sizes('task.train_sizes', config.train_sizes)
  count = config.num_train if split == 'train' else config.num_validation
  for i in range(count):
    rng = tasks_lib.example_rng(config.seed, _SPLITS[split], i)
    size = sizes[int(rng.integers(0, len(sizes)))]
    kwargs = {'depth': float(rng.uniform())} if spec.has_depth else {}
    yield tasks_lib.sized('task.train_sizes', lambda n: spec.generate(params, rng, n, **kwargs),
                          size)


class SyntheticTask(tfds.core.GeneratorBasedBuilder):
  """A synthetic task's training and validation examples (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [SyntheticTaskConfig(name='default')]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)  # see text_dir.TextDir.code_path

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Synthetic task examples, generated from a seed.',
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'scored': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            'size': tfds.features.Scalar(dtype=np.int32),
            'depth': tfds.features.Scalar(dtype=np.float32),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    examples = {split: list(generate(self.builder_config, split)) for split in _SPLITS
                if split == 'train' or self.builder_config.num_validation}
    self.info.metadata['max_tokens'] = max(len(e.tokens) for split in examples.values()
                                           for e in split)
    return {split: self._generate_examples(items) for split, items in examples.items()}

  def _generate_examples(self, examples):
    for i, e in enumerate(examples):
      yield i, {'tokens': e.tokens, 'scored': e.scored, 'size': e.size, 'depth': e.depth}


def load_synthetic_task(task_cfg, *, data_dir: str) -> SyntheticTask:
  """Builds the task's dataset under `data_dir` if it is not there yet; returns its builder."""
  spec = tasks_lib.get(task_cfg.name)
  spec.validate(task_cfg[spec.name])
  config = make_config(task_cfg)
  with text_dir.quiet():
    builder = SyntheticTask(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
