"""A user target module for tests/test_targets.py: loaded through the spec `plugin_target:make`."""

import torch

from dpg.targets import Target, output_matrix


def make(base_model, tokenizer=None, scale=1.0):
    """Plain callable: Φ = scale · sum(W_out[0])."""
    return lambda model: scale * output_matrix(model)[0].sum()


def make_target(base_model, tokenizer=None):
    """A full Target with its own report."""

    def phi(model):
        return output_matrix(model)[1].sum()

    def report(model):
        with torch.no_grad():
            return {"phi": float(phi(model)), "row_one_sum": float(phi(model))}

    return Target("row_one", phi, report)


def make_number(base_model, tokenizer=None):
    return 3.0
