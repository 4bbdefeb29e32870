"""A short prefill (a server's arrivals, a few prompts) as one CUDA graph replay.

Every prompt token of the step is a row of the decode forward: the token at position p of its prompt, its KV
slot, its prompt's block table and a context of p + 1 tokens. The attention op stores every row's k and v
before any row attends, so a token sees the tokens before it in the same step as well as the chunks already
cached. A few short prompts are then one graph launch where the packed prefill forward launches ~30 ops a
layer from Python (~20-60 ms a step on an H200 for the embedded model, against ~1 ms of GPU work). The token
count is padded to a power of two (padding rows write to the scratch slot and attend to that one token). A step
with more tokens or chunks than the largest graph takes (an eval's admission: ~16k tokens in ~130 prompts) is cut
into several launches, in order, so that a chunk cut in two finds its first part cached; only a step with a context
past PREFILL_CONTEXT takes the packed forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1kit.rollout.engine.decode_step import capture

PREFILL_CHUNKS = 64  # prompt chunks a graphed prefill takes at most: the rows of its logits
# The longest context a graphed prefill attends over: its kernel reads a token's whole context for each token (a
# chunk of n tokens at the end of a context of c reads ~n * c keys, where the packed forward's flash attention
# reads them once per tile of queries), which is cheap while a layer's keys stay in L2 (a 1,024-token context of a
# 32B model: 4 MB) and would be the step's main cost past it.
PREFILL_CONTEXT = 1024


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts that get a graph: powers of two from 16 up to max_tokens (itself rounded up to one)."""
    buckets = [16]
    while buckets[-1] < max_tokens:
        buckets.append(buckets[-1] * 2)
    return buckets


def cut(lengths: list[int], max_tokens: int, max_chunks: int) -> list[list[tuple[int, int, int]]]:
    """Chunks of these lengths cut into launches of at most max_tokens tokens in max_chunks pieces, filled in order:
    each launch a list of (chunk, from, to) pieces, a chunk cut where a launch is full."""
    launches: list[list[tuple[int, int, int]]] = [[]]
    room = max_tokens
    for i, length in enumerate(lengths):
        start = 0
        while start < length:
            if not room or len(launches[-1]) == max_chunks:
                launches.append([])
                room = max_tokens
            end = min(length, start + room)
            launches[-1].append((i, start, end))
            room -= end - start
            start = end
    return launches


class PrefillStep:
    """Buffers and graphs of short prefills (graphs captured at a bucket's first use, or by `capture_all`)."""

    def __init__(self, decoder, max_tokens: int, width: int):
        self.decoder, self.block_size = decoder, decoder.block_size
        self.buckets = token_buckets(max_tokens)
        rows, device = self.buckets[-1], decoder.device
        self.scratch_block = decoder.scratch_slot // decoder.block_size
        # per token: id, position in its prompt, KV slot, chunk; padding rows sit at position 0 of the scratch slot
        self.ints = torch.zeros(4, rows, dtype=torch.long, device=device)
        self.tables = torch.full((PREFILL_CHUNKS, width), self.scratch_block, dtype=torch.int32, device=device)
        self.last = torch.zeros(PREFILL_CHUNKS, dtype=torch.long, device=device)  # each chunk's last token row
        vocab = decoder.w["lm_head.weight"].shape[0]
        self.logits = torch.zeros(PREFILL_CHUNKS, vocab, dtype=torch.float32, device=device)
        self.graphs: dict[int, Callable[[], None]] = {}
        self.pool = None

    def fits(self, context: int) -> bool:
        """Whether a step whose longest chunk ends at position `context` runs as graphs."""
        return context <= PREFILL_CONTEXT

    def run(self, tokens: list[list[int]], starts: list[int], slots: list[list[int]], tables: list[list[int]]
            ) -> torch.Tensor:
        """Prefill chunk i (tokens[i] at positions starts[i] on, their KV slots slots[i], the earlier positions'
        KV cached already) through its prompt's block table tables[i]; (chunks, vocab) logits of each chunk's last
        token (a view valid until the next run, where the step took one launch)."""
        launches = cut(list(map(len, tokens)), self.buckets[-1], PREFILL_CHUNKS)
        if len(launches) == 1:
            return self._launch(tokens, starts, slots, tables)
        logits = self.logits.new_empty(len(tokens), self.logits.shape[1])
        for pieces in launches:
            out = self._launch([tokens[i][lo:hi] for i, lo, hi in pieces], [starts[i] + lo for i, lo, _ in pieces],
                               [slots[i][lo:hi] for i, lo, hi in pieces], [tables[i] for i, _, _ in pieces])
            ends = [j for j, (i, _, hi) in enumerate(pieces) if hi == len(tokens[i])]  # a chunk's last piece
            if ends:
                logits[[pieces[j][0] for j in ends]] = out[ends]
        return logits

    def _launch(self, tokens: list[list[int]], starts: list[int], slots: list[list[int]], tables: list[list[int]]
                ) -> torch.Tensor:
        """run() of chunks that fit one graph."""
        count = sum(len(t) for t in tokens)
        bucket = next(b for b in self.buckets if b >= count)
        ids, positions, chunks, lasts = [], [], [], []
        for i, (chunk, start) in enumerate(zip(tokens, starts, strict=True)):
            ids += chunk
            positions += range(start, start + len(chunk))
            chunks += [i] * len(chunk)
            lasts.append(len(ids) - 1)
        pad = bucket - count
        flat_slots = [slot for chunk in slots for slot in chunk] + [self.decoder.scratch_slot] * pad
        rows = [ids + [0] * pad, positions + [0] * pad, flat_slots, chunks + [0] * pad]
        self.ints[:, :bucket] = torch.tensor(rows, dtype=torch.long).to(self.ints.device)
        width = max(len(t) for t in tables)
        self.tables[: len(tables), :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                          dtype=torch.int32).to(self.tables.device)
        self.last.zero_()
        self.last[: len(lasts)] = torch.tensor(lasts).to(self.last.device)
        self._graph(bucket)()
        return self.logits[: len(tokens)]

    def _forward(self, bucket: int) -> None:
        ids, positions, slots, chunks = self.ints[:, :bucket]
        lens = (positions + 1).to(torch.int32)
        self.decoder.decode(ids, positions, slots, self.tables[chunks], lens, self.logits, self.last)

    def _graph(self, bucket: int) -> Callable[[], None]:
        """The bucket's graph; at its first use, the step is run once on the loaded rows (which compiles what a
        capture cannot), then captured."""
        if bucket not in self.graphs:
            self._forward(bucket)
            self.graphs[bucket] = self.capture(lambda: self._forward(bucket))
        return self.graphs[bucket]

    def capture_all(self) -> None:
        """Capture every bucket's graph now, on padding rows only (they write to the scratch slot alone)."""
        for bucket in self.buckets:
            if bucket not in self.graphs:
                self.ints[:, :bucket] = torch.tensor([0, 0, self.decoder.scratch_slot, 0],
                                                     device=self.ints.device)[:, None]
                self._graph(bucket)

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        """A CUDA graph of run() in this step's memory pool, as the function that replays it."""
        replay, self.pool = capture(run, self.pool)
        return replay
