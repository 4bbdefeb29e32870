"""A decode step of the running batch as one call, replayed from a CUDA graph where the GPU allows.

The running batch lives on the device in fixed buffers: each sequence's last token, context length, step
count (its sampling noise's position), sampling key and settings, and block table. A step derives the
model's inputs from them (positions, KV slots), runs the forward and the sampler, writes each row's token
and logprob into one (rows, 2) buffer, and advances the buffers in place. So a step of an unchanged batch
needs nothing from the host: the host uploads the batch when the running set changes, and reads back
the (B, 2) buffer each step.

A decode step of a small model is hundreds of small kernels; launched one by one, their launch cost is
the step's cost. With graphs on, a step (forward, sampler and the inputs' arithmetic: ~20 kernels more
than the forward alone) is captured once per batch-size bucket and sampler variant and replayed with one
launch. A batch is padded up to its bucket with rows whose block table points at the scratch slot: they
attend to that one token, never advance, and their outputs are never read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from r1kit.rollout.engine.sequence import Sequence
from r1kit.rollout.sampler import SamplingBatch, sample

# what a step samples with: no filter, top-k/top-p/min-p, or nothing (the caller samples from the logits:
# the repetition penalty needs each sequence's token history, which the device does not keep)
MODES = ("draw", "filter", "logits")


def buckets_for(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 2, 4, 8, then every 16 up to max_batch.

    No bucket of 1: torch.compile specializes a dimension of size 1 and would compile the step again."""
    small = [b for b in (2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch + 15, 16)) if max_batch > 8 else small + [max(max_batch, 2)]


class DecodeStep:
    """The running batch's state on the device and the step that advances it (graphed when `graphs`)."""

    def __init__(self, decoder, max_batch: int, width: int, graphs: bool, compile: bool = True):
        self.decoder, self.block_size, self.compile = decoder, decoder.block_size, compile
        self.buckets = buckets_for(max_batch) if graphs else None
        rows = self.buckets[-1] if graphs else max_batch
        # the scratch slot opens the block after the last one: a padding row's table points there
        self.scratch_block = decoder.scratch_slot // decoder.block_size
        vocab = decoder.w["lm_head.weight"].shape[0]

        def buffer(dtype: torch.dtype, fill: float, *shape: int) -> torch.Tensor:
            return torch.full((rows, *shape), fill, dtype=dtype, device=decoder.device)

        self.tokens, self.steps, self.keys = (buffer(torch.long, 0) for _ in range(3))
        self.lens = buffer(torch.int32, 1)  # context lengths, the last token included
        self.live = buffer(torch.int32, 0)  # 1 for a sequence, 0 for padding (which never advances)
        self.tables = buffer(torch.int32, self.scratch_block, width)
        self.top_k = buffer(torch.long, 0)
        self.temperature, self.top_p, self.min_p, self.penalty = (buffer(torch.float32, v) for v in (0, 1, 0, 1))
        self.logits = buffer(torch.float32, 0, vocab)
        self.sampled = buffer(torch.float64, 0, 2)  # token id and its logprob (float64 holds every id exactly)
        self.graphs: dict[tuple[int, str], Callable[[], None]] = {}
        self.pool = None

    def rows(self, batch: int) -> int:
        """The rows a step of this many sequences runs: its bucket, with graphs."""
        return batch if self.buckets is None else next(b for b in self.buckets if b >= batch)

    def load(self, seqs: list[Sequence]) -> None:
        """Upload a new running set's state (its first rows; the rest become padding)."""
        # the tables as wide as the longest here, not the buffer: a list of 512 x 512 block ids takes the host
        # ~20 ms to build (columns past a sequence's blocks, stale or not, are masked wherever read)
        batch, width = len(seqs), max((len(s.block_table) for s in seqs), default=0)
        device = self.tokens.device
        ints = torch.tensor([[s.last_token, s.length, len(s.output_ids), s.key, s.params.top_k] for s in seqs],
                            dtype=torch.long).reshape(batch, 5).to(device)
        floats = torch.tensor([[s.params.temperature, s.params.top_p, s.params.min_p, s.params.repetition_penalty]
                               for s in seqs], dtype=torch.float32).reshape(batch, 4).to(device)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                              dtype=torch.int32).reshape(batch, width).to(device)
        for target, column in zip((self.tokens, self.lens, self.steps, self.keys, self.top_k), ints.T, strict=True):
            target[:batch] = column
        for target, column in zip((self.temperature, self.top_p, self.min_p, self.penalty), floats.T, strict=True):
            target[:batch] = column
        self.tables[:batch, :width] = tables
        self.live[:batch], self.live[batch:] = 1, 0
        self.lens[batch:], self.tables[batch:] = 1, self.scratch_block

    def retire(self, rows: list[int]) -> None:
        """Make these rows padding (their sequences ended): they attend to the scratch slot, write their KV there
        and never advance. No upload of the others."""
        index = torch.tensor(rows, device=self.tokens.device)
        self.live[index], self.lens[index], self.tables[index] = 0, 1, self.scratch_block

    def sampling(self, rows: int, filtered: bool, penalized: bool = False) -> SamplingBatch:
        """The first rows' sampling settings."""
        return SamplingBatch(self.temperature[:rows], self.top_k[:rows], self.top_p[:rows], self.min_p[:rows],
                             self.penalty[:rows], filtered, penalized)

    def inputs(self, rows: int) -> tuple[torch.Tensor, ...]:
        """The forward's inputs for the first rows: last tokens, positions, KV slots, block tables, lengths."""
        lens, tables = self.lens[:rows], self.tables[:rows]
        positions = lens.long() - 1
        blocks = tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1).long()
        return self.tokens[:rows], positions, blocks * self.block_size + positions % self.block_size, tables, lens

    def step(self, batch: int, filtered: bool) -> torch.Tensor:
        """A whole step of the loaded batch's first `batch` sequences; their (batch, 2) tokens and logprobs,
        a view valid until the next step."""
        self._run(batch, "filter" if filtered else "draw")
        return self.sampled[:batch]

    def forward(self, batch: int) -> torch.Tensor:
        """The forward only: (batch, vocab) logits for the caller to sample from, then to `advance()` with."""
        self._run(batch, "logits")
        return self.logits[:batch]

    def advance(self, batch: int, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Record the first rows' sampled tokens and step them on; their (batch, 2) tokens and logprobs."""
        self.sampled[:batch, 0], self.sampled[:batch, 1] = tokens, logprobs
        self.tokens[:batch] = tokens
        live = self.live[:batch]
        self.lens[:batch] += live
        self.steps[:batch] += live
        return self.sampled[:batch]

    def _step(self, rows: int, mode: str) -> None:
        tokens, positions, slots, tables, lens = self.inputs(rows)
        logits = self.decoder.decode(tokens, positions, slots, tables, lens, self.logits[:rows])
        if mode != "logits":
            sampling = self.sampling(rows, filtered=mode == "filter")
            self.advance(rows, *sample(logits, sampling, self.keys[:rows], self.steps[:rows], compile=self.compile))

    def _run(self, batch: int, mode: str) -> None:
        rows = self.rows(batch)
        if self.buckets is None:
            self._step(rows, mode)
        elif (rows, mode) in self.graphs:
            self.graphs[rows, mode]()
        else:
            self._step_and_capture(rows, mode)

    def _step_and_capture(self, rows: int, mode: str) -> None:
        """Run the step once (its kernels compile, which a capture cannot do), then capture its graph."""
        self._step(rows, mode)
        self.graphs[rows, mode] = self.capture(partial(self._step, rows, mode))

    def capture_all(self) -> None:
        """Capture every bucket's sampling steps not captured yet, on padding rows only (they touch no real
        KV): after it, load() the running set again."""
        if self.buckets is None:
            return
        self.load([])
        for rows in self.buckets:
            for mode in MODES[:2]:
                if (rows, mode) not in self.graphs:
                    self._step_and_capture(rows, mode)

    def prime(self) -> None:
        """Compile the forward at the smallest bucket before any other size (on padding rows: load() the running
        set after it). Inductor tunes each kernel's launch at its first call and keeps it for every batch size:
        tuned at 512 rows, the fused SiLU x up kernel took 2.2 us a layer at batch 1, against 1.1 us tuned at
        2 rows (H200)."""
        self.load([])
        self._step_and_capture(self.buckets[0], "logits")

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        """A CUDA graph of run() in this step's memory pool, as the function that replays it."""
        replay, self.pool = capture(run, self.pool)
        return replay


def capture(run: Callable[[], None], pool) -> tuple[Callable[[], None], object]:
    """A CUDA graph of run() (recorded, not run: its kernels were compiled by a call before) in the memory pool
    (None: a new one); (the function that replays it, the pool)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph.replay, graph.pool()
