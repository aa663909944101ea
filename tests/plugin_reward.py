"""A user text reward for tests/test_pipeline.py: loaded through rewards.name=plugin_reward:constant."""

import torch


def constant(texts, goal):
    """The same reward for every text: a batch without reward spread (no learning signal)."""
    return torch.full((len(texts),), 0.25, dtype=torch.float64)
