"""Declarative attention stacks: a tree of nodes per layer, built from dicts or YAML.

Node grammar (recursive)::

    {op: dense}                                                  Branch, no selector
    {selector: {name: xattention, threshold: 0.9}, op: block_sparse}    Branch
    {router: {name: table, ...}, branches: {full: NODE, sparse: NODE}}  Routed
    {compress: {name: token_coverage}, inner: NODE}                     Compressed
    {...any of the above..., decode: NODE}                              Phased (its own decode part)

A stack: ``{name, default: NODE, layers: {"0-1": NODE, "15-28": NODE}}``. ``build`` checks every
name, key, type and plan-kind pairing up front and reports the dotted path of the first problem.

Data flows one way: selector -> plan -> op. A Routed node asks its router for a HeadPlan
(one branch per batch element and KV head), then runs *one call per branch* on exactly the
(batch, KV head) pairs routed to it, folded into the batch dimension, and writes the outputs
back in head order — unless every branch can be written as a head mode (dense, streaming
ranges, block-sparse plan) and a single-launch ``mixed`` backend (Triton, on CUDA) takes the
call: then the branches' plans are assembled into one MixedPlan and run in one launch.
A Compressed node gathers each head's kept tokens, runs its inner node on the shorter tensors
and scatters the result back (dropped tokens get zeros).
"""

from ..context import CallContext
from .build import build, build_node
from .compressed import Compressed
from .layers import LayerStack, describe_node
from .nodes import Branch, DensityMeter, Node, dense_below_applies, density_of, head_mode
from .phased import Phased
from .routed import Routed
from .runner import run

__all__ = ["CallContext", "DensityMeter", "Node", "Branch", "Routed", "Compressed", "Phased", "LayerStack", "build",
           "build_node", "run", "describe_node", "dense_below_applies", "density_of", "head_mode"]
