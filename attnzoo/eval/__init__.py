"""Evaluation: metrics now; the NIAH suite and Pareto plots arrive with `attnzoo compare`."""

from .metrics import attention_recall, density, relative_error

__all__ = ["attention_recall", "density", "relative_error"]
