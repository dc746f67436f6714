"""Training: SSA alignment (``ssa``) and the Elastic Attention head router (``elastic``).

Both work on any Hugging Face causal LM: a training attention function is installed per layer
(the same interface ``attnzoo.patch`` uses) that computes the full and the sparse branch, and
the trainer turns their outputs into losses. Data comes from offline text (``data``).
"""

from .data import Sample, training_samples
from .elastic import route_prior, train_elastic
from .ssa import train_ssa

__all__ = ["Sample", "training_samples", "route_prior", "train_elastic", "train_ssa"]
