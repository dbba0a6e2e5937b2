"""Reverse-mode differentiation of an ONNX forward graph, written as ONNX nodes.

`Differentiator` walks a forward graph backwards and, for every op between a
trainable parameter and the loss, appends the nodes of its vector-Jacobian
product through a `Builder` that names them. Only default-domain ops are
emitted, so the result runs on any ONNX Runtime build;
`fedclient.runtime._stepgraph` assembles the step graph around it. The rules
come in families, one module each:

    _grad_dense      Gemm, MatMul (2-D and batched), activations, elementwise
                     arithmetic with broadcasting, reshaping, Concat, reductions
    _grad_conv       Conv, MaxPool, AveragePool, GlobalAveragePool
    _grad_sequence   Gather (embeddings, indexing), LayerNormalization, Where,
                     Slice, Split, Expand, Cast, Pow: what transformers export to
"""

from __future__ import annotations

from fedclient.runtime._grad_conv import ConvRules
from fedclient.runtime._grad_dense import DenseRules
from fedclient.runtime._grad_sequence import SequenceRules
from fedclient.runtime._gradbase import Builder, NoGradientRule

__all__ = ["Builder", "Differentiator", "NoGradientRule"]


class Differentiator(DenseRules, ConvRules, SequenceRules):
    """Reverse-mode differentiation of one forward graph, emitting ONNX nodes."""
