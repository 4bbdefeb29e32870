"""Which sequences run next: prefill prompt chunks (admitting waiting requests while KV blocks and batch
slots last), else decode.

A request's blocks are reserved in full when it is admitted (prompt plus max_tokens), so a running
sequence never waits for memory and nothing is ever preempted; a sequence that stops early gives its
blocks back at once, and the next waiting request takes them (continuous batching). A prefill step runs
at most max_prefill_tokens prompt tokens: a longer prompt is prefilled a chunk a step, and while
sequences run, prefill steps alternate with their decode steps (chunked prefill), so a long prompt delays
each running sequence's next token by one chunk, not by the whole prompt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from r1kit.rollout.engine.block_manager import BlockManager
from r1kit.rollout.engine.sequence import Sequence


@dataclass(eq=False)  # a request is itself: compared by identity, never field by field
class Request:
    """A prompt and its n sequences. With `shared`, the n sequences point at one copy of the prompt's
    full KV blocks and the prompt is prefilled once."""

    id: int
    sequences: list[Sequence]
    shared: bool
    arrived: float = 0.0  # when it was queued (the engine's clock)
    prefilled: int = 0  # prompt tokens whose KV is in the cache

    @property
    def prompt_ids(self) -> list[int]:
        return self.sequences[0].prompt_ids

    @property
    def rows(self) -> int:
        """Prompt copies a prefill runs: one for a shared prompt, else one per sequence."""
        return 1 if self.shared else len(self.sequences)


@dataclass
class Chunk:
    """Positions [start, end) of a request's prompt, prefilled in one step."""

    request: Request
    start: int
    end: int

    @property
    def tokens(self) -> int:
        """Tokens the step runs for it: the chunk once per prompt copy."""
        return (self.end - self.start) * self.request.rows


class Scheduler:
    """Keeps the waiting queue and the running set; `schedule()` says what the next step runs."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_prefill_tokens: int):
        self.blocks, self.max_num_seqs, self.max_prefill_tokens = blocks, max_num_seqs, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, their blocks reserved, their prompts not yet all prefilled
        self.running: list[Sequence] = []
        self._prefilled_last = False  # the last step scheduled was a prefill

    def add(self, request: Request) -> None:
        needed = self._blocks_needed(request)
        if needed > len(self.blocks.refs) or len(request.sequences) > self.max_num_seqs:
            raise ValueError(f"request of {len(request.prompt_ids)} prompt tokens x {len(request.sequences)} "
                             f"sequences needs {needed} KV blocks and the cache has {len(self.blocks.refs)}; "
                             "raise the engine's KV memory or lower n / max_tokens")
        self.waiting.append(request)

    def _blocks_needed(self, request: Request) -> int:
        seq = request.sequences[0]
        per_seq = self.blocks.blocks_for(len(seq.prompt_ids) + seq.params.max_tokens)
        if not request.shared:
            return per_seq * len(request.sequences)
        full = len(seq.prompt_ids) // self.blocks.block_size
        return full + (per_seq - full) * len(request.sequences)

    def _allocate(self, request: Request) -> None:
        seqs = request.sequences
        per_seq = self.blocks.blocks_for(len(request.prompt_ids) + seqs[0].params.max_tokens)
        if not request.shared:
            for seq in seqs:
                seq.block_table = self.blocks.allocate(per_seq)
            return
        full = len(request.prompt_ids) // self.blocks.block_size
        prompt_blocks = self.blocks.allocate(full)
        for i, seq in enumerate(seqs):
            shared = prompt_blocks if i == 0 else self.blocks.share(prompt_blocks)
            seq.block_table = shared + self.blocks.allocate(per_seq - full)

    def schedule(self, admit: bool = True) -> tuple[str, list[Chunk] | list[Sequence]]:
        """("prefill", prompt chunks) when any are due, else ("decode", the running sequences). A prefill
        continues the prompts being prefilled, then admits waiting requests (when `admit`); never two in a row
        while sequences run."""
        chunks = [] if self.running and self._prefilled_last else self._chunks(admit)
        self._prefilled_last = bool(chunks)
        if chunks:
            return "prefill", chunks
        return "decode", self.running

    def _chunks(self, admit: bool) -> list[Chunk]:
        """The next prefill step's chunks, within max_prefill_tokens: the partly prefilled requests' first,
        oldest first, then those of waiting requests admitted now (their blocks allocated)."""
        chunks: list[Chunk] = []
        for request in self.prefilling:
            if (chunk := self._chunk(request, chunks)) is None:
                return chunks
            chunks.append(chunk)
        seqs = len(self.running) + sum(len(r.sequences) for r in self.prefilling)
        while admit and self.waiting:
            request = self.waiting[0]
            if seqs + len(request.sequences) > self.max_num_seqs:
                break
            if not self.blocks.can_allocate(self._blocks_needed(request)):
                break
            if (chunk := self._chunk(request, chunks)) is None:
                break
            self._allocate(self.waiting.popleft())
            self.prefilling.append(request)
            chunks.append(chunk)
            seqs += len(request.sequences)
        return chunks

    def _chunk(self, request: Request, chunks: list[Chunk]) -> Chunk | None:
        """The request's next chunk in what the step's other chunks leave of the budget (one token at least in
        a step of its own), or None where none fits."""
        budget = self.max_prefill_tokens - sum(c.tokens for c in chunks)
        size = min(len(request.prompt_ids) - request.prefilled, budget // request.rows or int(not chunks))
        return Chunk(request, request.prefilled, request.prefilled + size) if size > 0 else None

    def prefilled(self, chunk: Chunk) -> bool:
        """Record that a chunk ran; whether that completed its prompt (its sequences then join the running set)."""
        request = chunk.request
        request.prefilled = chunk.end
        if chunk.end < len(request.prompt_ids):
            return False
        self.prefilling.remove(request)
        self.running += request.sequences
        return True

    def drop(self, request: Request) -> None:
        """Forget a request that does not run yet (waiting or partly prefilled); finish() frees its blocks."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.prefilling:
            self.prefilling.remove(request)

    def finish(self, seq: Sequence) -> None:
        """A sequence is done: its blocks go back (shared prompt blocks when the last sibling is done).
        It may not have joined the running set yet (a prefill that failed)."""
        self.blocks.release(seq.block_table)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
