"""Evaluation: plan metrics (density, attention recall, relative error), the NIAH suite, and
`attnzoo compare` (runner and report)."""

from .metrics import attention_recall, density, relative_error

__all__ = ["attention_recall", "density", "relative_error"]
