"""A progress bar for long benchmark loops (tqdm when installed, else one line per item)."""

import sys


def progress(iterable, total: int | None = None, desc: str = ""):
  """A tqdm progress bar on stderr, or plain one-line updates when tqdm is missing."""
  try:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    return tqdm.tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
  except ImportError:
    return _plain_progress(iterable, total, desc)


def _plain_progress(iterable, total, desc):
  items = list(iterable)
  for i, item in enumerate(items):
    print(f"{desc} {i + 1}/{total or len(items)}", file=sys.stderr, flush=True)
    yield item
