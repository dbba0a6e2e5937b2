"""A small next-character transformer for Shakespeare: 80 character ids in, the next out.

    ids (n, 80) int64 -> embedding (80 x 64) + learned positions (80 x 64)
    1 pre-norm encoder layer: self-attention (4 heads), GELU MLP 64-128-64, computed at
    the last position only (its query over the whole window: `LastQueryLayer`)
    LayerNorm, beside the embeddings of the last 8 characters
    -> head: linear 576 x 256, GELU, linear 256 x 80                      (n, 80) logits

212,112 parameters. The last characters' embeddings reach the head directly, through
a hidden layer: with the devices' plain SGD the model learns the short-range
statistics of the text (which letters follow which) in a few thousand examples, and
the attention the context. Trials here (central SGD, lr 0.25, batch 16, the union of
the devices' windows): the earlier default (a linear head on the last 4 characters,
``recent=4, head_hidden=0``, 69,520 parameters) was at 0.33 after 64,000 examples and
0.35 after 192,000; this one 0.375 after 75,000 and 0.41 after 100,000. Before that, the
two-layer model without the recent path (``layers=2, recent=0``: the 82,512-parameter
model of the central baseline in shared/notes/baselines.md) was at 0.21 after 20,000
examples (lr 0.5), the one with it at 0.32.

Only the last position's output reaches the head, so the last layer computes only
it (``last_query=True``): the same function as ``nn.TransformerEncoderLayer`` there
(within 3e-7), 2.5x faster in PyTorch and 3.6x on ONNX Runtime's step graph. With
``last_query=False`` every layer is a full ``nn.TransformerEncoderLayer`` (causal).

``fedconvert charformer:Net --input-shape 80 --input-dtype int64`` makes the device
bundle (bench/shakespeare.py does).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VOCABULARY", "WINDOW", "Net"]

#: LEAF's 80 characters (fedclient.sim.shakespeare.ALPHABET), and the window length.
VOCABULARY = 80
WINDOW = 80


class LastQueryLayer(nn.Module):
    """A pre-norm encoder layer computed at the last position only: its query attends over
    the whole window (keys and values of every position), then the MLP. What
    ``nn.TransformerEncoderLayer(norm_first=True)`` gives at the last position, causal mask
    or not (the last position sees the whole window), at a fraction of the work: the
    other 79 positions' attention and MLP feed nothing the head reads."""

    def __init__(self, width: int, heads: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, T, width) -> (n, width): the layer's output at position T - 1."""
        normed = self.norm1(x)
        query = normed[:, -1:]
        attended = self.self_attn(query, normed, normed, need_weights=False)[0]
        h = x[:, -1] + attended[:, 0]
        return h + self.linear2(self.activation(self.linear1(self.norm2(h))))


class Net(nn.Module):
    """The transformer above, freshly initialised with ``seed`` (PyTorch's defaults)."""

    def __init__(
        self,
        *,
        width: int = 64,
        heads: int = 4,
        layers: int = 1,
        hidden: int = 128,
        activation: str = "gelu",
        norm_first: bool = True,
        recent: int = 8,
        head_hidden: int = 256,
        last_query: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCABULARY, width)
        self.pos = nn.Parameter(torch.randn(WINDOW, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            hidden,
            dropout=0.0,
            activation=activation,
            batch_first=True,
            norm_first=norm_first,
        )
        full = layers - 1 if last_query else layers
        self.encoder = nn.TransformerEncoder(layer, full, enable_nested_tensor=False)
        # nn.TransformerEncoder starts every layer as a copy of the first: draw each anew.
        for block in self.encoder.layers:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            block.self_attn._reset_parameters()
        self.last: LastQueryLayer | None = None
        if last_query:
            if not norm_first:
                raise ValueError("last_query is written for pre-norm layers")
            self.last = LastQueryLayer(width, heads, hidden, activation)
        self.norm = nn.LayerNorm(width)
        #: The embeddings of the last ``recent`` characters also reach the head directly.
        self.recent = recent
        features = width * (1 + recent)
        self.head: nn.Module = nn.Linear(features, VOCABULARY)
        if head_hidden:
            self.head = nn.Sequential(
                nn.Linear(features, head_hidden), nn.GELU(), nn.Linear(head_hidden, VOCABULARY)
            )
        self.register_buffer("mask", torch.triu(torch.full((WINDOW, WINDOW), float("-inf")), 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the character after each window, shape (n, 80)."""
        embedded = self.embed(ids)
        h = embedded + self.pos
        if len(self.encoder.layers):
            h = self.encoder(h, mask=self.mask)
        features = self.norm(h[:, -1] if self.last is None else self.last(h))
        if self.recent:
            last = embedded[:, -self.recent :].flatten(1)
            features = torch.cat([features, last], 1)
        return self.head(features)  # type: ignore[no-any-return]
