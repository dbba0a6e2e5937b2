"""A small next-character transformer for Shakespeare: 80 character ids in, the next out.

    ids (n, 80) int64 -> embedding (80 x 64) + learned positions (80 x 64)
    1 pre-norm encoder layer: causal self-attention (4 heads), GELU MLP 64-128-64
    LayerNorm -> the last position, beside the embeddings of the last 4 characters
    -> linear 320 x 80                                                    (n, 80) logits

69,520 parameters. The last characters' embeddings reach the head directly: with
the devices' plain SGD the model learns the short-range statistics of the text
(which letters follow which) in a few thousand examples, and the attention the
context. In a trial here (central SGD, lr 0.5, batch 16), the two-layer model
without that path (``layers=2, recent=0``: the 82,512-parameter model of the
central baseline in shared/notes/baselines.md) was at 0.21 after 20,000
examples, this one at 0.32, at half the compute an example.

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
        recent: int = 4,
        head_hidden: int = 0,
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
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # nn.TransformerEncoder starts every layer as a copy of the first: draw each anew.
        for block in self.encoder.layers:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            block.self_attn._reset_parameters()
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
        h = self.encoder(embedded + self.pos, mask=self.mask)
        features = self.norm(h[:, -1])
        if self.recent:
            last = embedded[:, -self.recent :].flatten(1)
            features = torch.cat([features, last], 1)
        return self.head(features)  # type: ignore[no-any-return]
