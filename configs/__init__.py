"""ml_collections config files: each defines `get_config(arg)`.

Use with absl: `python -m experiments.train --config=configs/quickstart.py --config.train.steps=10`.
"""
