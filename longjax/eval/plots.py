"""Matplotlib figures written into a run's `plots/` folder (PNG, no display needed)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np


def _legend(ax, num_series: int) -> None:
  # Many overlaid methods hide the curves under the legend: put it beside the axes instead.
  if num_series > 3:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
  else:
    ax.legend()


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def _style(index: int, num_series: int) -> dict:
  """Distinct colour and marker per series; tab20 once the default 10 colours would repeat."""
  color = plt.get_cmap("tab20")(index % 20) if num_series > 10 else f"C{index % 10}"
  return {"color": color, "marker": _MARKERS[index % len(_MARKERS)], "ls": "-"}


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def training_curve(metrics: list[dict], path: str, *, baseline: float | None = None) -> str:
  """Training loss (and validation loss where logged) against step."""
  fig, ax = plt.subplots(figsize=(6, 4))
  train = [m for m in metrics if "loss" in m]
  ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss")
  val = [m for m in metrics if "val_loss" in m]
  if val:
    ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss")
  if baseline is not None:
    ax.axhline(baseline, color="gray", ls="--", label="unigram baseline")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def loss_vs_length(sweeps: dict[str, dict], train_length: int, path: str, *,
                   key: str = "loss", baseline: float | None = None) -> str:
  """One line per method: mean loss over the whole context against context length."""
  fig, ax = plt.subplots(figsize=(8 if len(sweeps) > 3 else 6, 4))
  for i, (label, sweep) in enumerate(sweeps.items()):
    ax.plot(sweep["lengths"], sweep[key], label=label, **_style(i, len(sweeps)))
  ax.axvline(train_length, color="k", ls=":", label=f"train length {train_length}")
  if baseline is not None:
    ax.axhline(baseline, color="gray", ls="--", label="unigram baseline")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("evaluation context length (tokens)")
  ax.set_ylabel("bits per byte" if key == "bits_per_byte" else "loss (nats / token)")
  ax.grid(alpha=0.3)
  _legend(ax, len(sweeps))
  return _save(fig, path)


def loss_vs_position(sweeps: dict[str, dict], train_length: int, path: str, *,
                     bins: int = 48) -> str:
  """Loss at each token position (log-spaced bins) at the longest evaluated length."""
  fig, ax = plt.subplots(figsize=(8 if len(sweeps) > 3 else 6, 4))
  for i, (label, sweep) in enumerate(sweeps.items()):
    longest = str(max(sweep["lengths"]))
    losses = np.asarray(sweep["per_position"][longest])
    edges = np.unique(np.geomspace(1, len(losses), bins).astype(int))
    centers = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    means = [losses[lo - 1:hi - 1].mean() for lo, hi in zip(edges[:-1], edges[1:])]
    ax.plot(centers, means, label=f"{label} (L={longest})",
            **dict(_style(i, len(sweeps)), marker=None))
  ax.axvline(train_length, color="k", ls=":", label=f"train length {train_length}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("token position")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  _legend(ax, len(sweeps))
  return _save(fig, path)


def accuracy_vs_size(sweeps: dict[str, dict], train_max: int, path: str) -> str:
  """One line per model or method: exact-match accuracy against the task's size."""
  fig, ax = plt.subplots(figsize=(8 if len(sweeps) > 3 else 6, 4))
  unit = "size"
  for i, (label, sweep) in enumerate(sweeps.items()):
    ax.plot(sweep["sizes"], sweep["accuracy"], label=label, **_style(i, len(sweeps)))
    unit = sweep["size_unit"]
  ax.axvline(train_max + 0.5, color="k", ls=":", label=f"largest training size {train_max}")
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel(f"test size ({unit})")
  ax.set_ylabel("exact-match accuracy")
  ax.grid(alpha=0.3)
  _legend(ax, len(sweeps))
  return _save(fig, path)


def accuracy_heatmap(grid: dict, path: str, *, train_length: int | None = None,
                     title: str = "") -> str:
  """Retrieval accuracy on the length x depth grid (depth down, length across)."""
  accuracy = np.asarray(grid["accuracy"]).T  # [depths, lengths]
  fig, ax = plt.subplots(figsize=(1.1 * len(grid["lengths"]) + 2.5, 0.5 * len(grid["depths"]) + 2))
  image = ax.imshow(accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
  for (d, l), value in np.ndenumerate(accuracy):
    ax.text(l, d, f"{value:.2f}", ha="center", va="center", fontsize="small")
  ax.set_xticks(range(len(grid["lengths"])),
                [f"{n}{'*' if train_length and n <= train_length else ''}"
                 for n in grid["lengths"]])
  ax.set_yticks(range(len(grid["depths"])), [f"{d:g}" for d in grid["depths"]])
  ax.set_xlabel("context length (tokens)" + ("; * within training length" if train_length
                                              else ""))
  ax.set_ylabel("needle depth")
  ax.set_title(title or f"{grid['task']} accuracy")
  fig.colorbar(image, ax=ax, fraction=0.05)
  return _save(fig, path)
