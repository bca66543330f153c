"""`train(config, workdir)`: the training loop, checkpoints and metrics.

Evaluation after training is `longjax.experiment.train_and_evaluate`, so that training does not
depend on `longjax.eval` (which uses training's step functions).

Nothing is lost on interruption: a restarted run resumes from the newest restorable checkpoint
(parameters, optimizer state, step and the data iterator's position, so the batches continue
exactly where they stopped); Ctrl-C (SIGINT) or SIGTERM saves a checkpoint before exiting; a
non-finite loss stops the run without saving, leaving the last good checkpoint as the latest.
"""

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import numpy as np
from tqdm import auto as tqdm

from longjax import configuration, posenc
from longjax.data import corpus as corpus_lib
from longjax.parallel import mesh as mesh_lib
from longjax.training import checkpoints, resume, state as state_lib, step as step_lib
from longjax.training.metrics import MetricsWriter

# The step's metrics that stop the run when they are not finite, with their names in messages.
_WATCHED = {"loss": "the loss", "grad_norm": "the gradient norm",
            "param_norm": "the parameter norm"}


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message says where and what was kept."""


@dataclasses.dataclass
class TrainResult:
  step: int
  interrupted: bool
  final_loss: float | None    # None when no step was trained in this call
  val_loss: float | None
  already_complete: bool = False  # the run had reached train.steps: nothing was done
  config: Any = None          # the resolved config, and what evaluation needs of the model:
  graphdef: Any = None
  params: Any = None
  corpus: Any = None
  eval: dict = dataclasses.field(default_factory=dict)  # filled by experiment.train_and_evaluate


class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C
  interrupts immediately)."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a notebook worker): keep defaults
        pass
    return self

  def _handle(self, signum, frame):
    if self.requested:
      signal.default_int_handler(signum, frame)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _global_batch(local_batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# Module level, so every validation pass of a run reuses one compilation (a jit of a fresh
# functools.partial per call would retrace and recompile each time).
_eval_step = jax.jit(step_lib.eval_step, static_argnums=0)


def _validation_loss(config, graphdef, params, corpus, sharding) -> float:
  it = corpus.train_iterator(
      source=corpus.validation, seq_len=config.data.seq_len,
      batch_size=config.train.batch_size // jax.process_count(), seed=0,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  total = count = 0.0
  for _ in range(config.train.eval_batches):
    out = _eval_step(graphdef, params, _global_batch(next(it), sharding))
    total += float(out["loss_sum"])
    count += float(out["weight_sum"])
  return total / max(count, 1.0)


def train(config, workdir: str, *, progress: bool = True,
          is_complete=lambda workdir: True) -> TrainResult:
  """Trains `config` in `workdir`, resuming if it holds checkpoints.

  Args:
    config: the run's config (validated here).
    workdir: the run directory.
    progress: show a progress bar.
    is_complete: for a run already at `train.steps`, whether nothing is left to do in
      `workdir` (e.g. its evaluation results exist); if not, the state is restored and the
      validation loss computed for what follows. A run past `train.steps` is always complete.

  Raises:
    ConfigError: before anything is written, for a bad config value.
    ResumeError: before anything is written, when `workdir` holds a run of another config
      (see `longjax.training.resume`) or cannot be used.
    CheckpointError: the run's checkpoints cannot be restored (nothing is moved or written).
    NonFiniteLossError: when the loss stops being finite.
  """
  config = configuration.checked(config, jax.device_count())
  # Before anything is written: a changed config must not touch an existing run.
  changes = resume.check_workdir(workdir, config)
  config_dict = config.to_dict()

  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.parse_rules(config.mesh.rules)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  corpus = corpus_lib.load_corpus(config, workdir)
  tx, schedule = state_lib.make_model_optimizer(config.model, config.train,
                                                vocab_size=corpus.tokenizer.vocab_size)
  graphdef, state, shardings = state_lib.create_train_state(
      config.model, tx, vocab_size=corpus.tokenizer.vocab_size, mesh=mesh, rules=rules,
      seed=config.seed)
  data_iter = corpus.train_iterator(
      source=corpus.train, seq_len=config.data.seq_len,
      batch_size=config.train.batch_size // jax.process_count(), seed=config.data.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count())

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep=config.train.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(state, data_iter)
  except checkpoints.CheckpointError:
    ckpt.close()
    raise
  if restored is not None:
    state = restored
  start = int(jax.device_get(state.step))
  if start:
    logging.warning("resuming from the checkpoint of step %d", start)
    for change in changes:
      logging.warning("resuming with %s", change)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(configuration.to_json(config))
  steps = config.train.steps
  if start >= steps and (start > steps or is_complete(workdir)):
    ckpt.close()
    return TrainResult(step=start, interrupted=False, final_loss=None, val_loss=None,
                       already_complete=True, config=config)
  writer = MetricsWriter(workdir, resume_step=start)

  # Training-time positions (randomized, PoSE) change train_step only, never evaluation.
  step_fn = functools.partial(
      step_lib.train_step, graphdef, tx, schedule,
      position_transform=posenc.make_position_transform(config.model.posenc),
      position_seed=config.seed)
  train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  loss = val_loss = None
  window_losses, window_start, window_steps = [], None, 0
  interrupted = False
  first_step_seconds = None
  loop_start = time.perf_counter()

  bar = tqdm.tqdm(total=steps, initial=start, desc="train", disable=not progress,
                  dynamic_ncols=True)
  try:
    with _StopRequest() as stop:
      for step in range(start + 1, steps + 1):
        batch = _global_batch(next(data_iter), batch_sharding)
        state, metrics = train_step(state, batch)
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        bad = [k for k in _WATCHED if not math.isfinite(metrics[k])]
        if bad:
          raise NonFiniteLossError(
              " and ".join(f"{_WATCHED[k]} is {metrics[k]}" for k in bad)
              + f" at step {step}; stopped without saving (loss {loss}, gradient norm "
              f"{metrics['grad_norm']}, parameter norm {metrics['param_norm']}). "
              + (f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}; "
                 if ckpt.latest_step() is not None else "No checkpoint was saved yet; ")
              + "lower train.learning_rate or raise train.warmup_steps, then rerun.")
        window_losses.append(loss)
        window_steps += 1
        if window_start is None:  # the first step includes compilation: time from its end
          window_start, window_steps = time.perf_counter(), 0
          first_step_seconds = window_start - loop_start
        if step % config.train.log_every == 0 or step == steps:
          elapsed = time.perf_counter() - window_start
          record = {"loss": float(np.mean(window_losses)), "lr": float(metrics["lr"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    # None (JSON null) until a step has been timed without compilation.
                    "tokens_per_sec": tokens_per_step * window_steps / elapsed if window_steps
                                      else None}
          if first_step_seconds is not None:
            record["first_step_seconds"] = first_step_seconds  # includes compilation
            first_step_seconds = None
          if step == steps or (config.train.eval_every and step % config.train.eval_every == 0):
            val_loss = record["val_loss"] = _validation_loss(config, graphdef, state.params,
                                                             corpus, batch_sharding)
          writer.write(step, record)
          bar.set_postfix(loss=f"{record['loss']:.3f}",
                          tok_s=f"{record['tokens_per_sec'] or 0:.0f}")
          window_losses, window_start, window_steps = [], time.perf_counter(), 0
        bar.update()
        if step % config.train.checkpoint_every == 0 or step == steps or stop.requested:
          ckpt.save(step, state, data_iter, config_dict)
        if stop.requested:
          interrupted = True
          logging.warning("interrupted at step %d; checkpoint saved, rerun to resume", step)
          break
  finally:
    bar.close()
    ckpt.close()
    writer.close()

  if interrupted:
    return TrainResult(step=int(state.step), interrupted=True, final_loss=loss, val_loss=val_loss,
                       config=config)
  if start == steps:  # complete but for what follows training: its validation loss
    val_loss = _validation_loss(config, graphdef, state.params, corpus, batch_sharding)
  return TrainResult(step=steps, interrupted=False, final_loss=loss, val_loss=val_loss,
                     config=config, graphdef=graphdef, params=state.params, corpus=corpus)
