"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket, captured on first use.

A decode step of a small model is hundreds of small kernels; launched one by one from Python, their
launch cost is the step's cost. A graph replays them all with one launch. Inputs live in static buffers
that each step fills; a batch is padded up to its bucket with rows that write their KV to a scratch slot
and attend to one token, and their logits are never read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def buckets_for(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 2, 4, 8, then every 16 up to max_batch.

    No bucket of 1: torch.compile specializes a dimension of size 1 and would compile the step again."""
    small = [b for b in (2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch + 15, 16)) if max_batch > 8 else small + [max(max_batch, 2)]


class GraphedDecode:
    """Calls `step(tokens, positions, slots, tables, lens, out)`, which writes logits into out, through
    captured CUDA graphs."""

    def __init__(self, step: Callable[..., torch.Tensor], max_batch: int, width: int, vocab: int,
                 scratch_slot: int, device: torch.device):
        self.step, self.scratch_slot = step, scratch_slot
        self.buckets = buckets_for(max_batch)
        rows = self.buckets[-1]
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self.lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.logits = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        self.graphs: dict[int, Callable[[], None]] = {}  # bucket -> replay
        self.pool = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor) -> torch.Tensor:
        """(B, vocab) logits, a view valid until the next call."""
        batch = tokens.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        for buffer, value, pad in ((self.tokens, tokens, 0), (self.positions, positions, 0),
                                   (self.slots, slots, self.scratch_slot), (self.lens, lens, 1)):
            buffer[:batch] = value
            buffer[batch:bucket] = pad
        self.tables[:batch, : tables.shape[1]] = tables
        if bucket not in self.graphs:
            self.graphs[bucket] = self.capture(self._bucket_step(bucket))
        self.graphs[bucket]()
        return self.logits[:batch]

    def capture_all(self) -> None:
        """Capture every bucket's graph not captured yet, on padding rows only (they touch no real KV)."""
        for buffer, pad in ((self.tokens, 0), (self.positions, 0), (self.slots, self.scratch_slot), (self.lens, 1)):
            buffer.fill_(pad)
        self.tables.zero_()
        for bucket in self.buckets:
            if bucket not in self.graphs:
                self.graphs[bucket] = self.capture(self._bucket_step(bucket))

    def _bucket_step(self, bucket: int) -> Callable[[], None]:
        inputs = (self.tokens[:bucket], self.positions[:bucket], self.slots[:bucket], self.tables[:bucket],
                  self.lens[:bucket])

        def run() -> None:
            self.step(*inputs, self.logits[:bucket])

        return run

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        """A CUDA graph of run(), as a function that replays it."""
        run()  # warm-up: compiles kernels, which capture cannot
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            run()
        self.pool = graph.pool()
        return graph.replay
