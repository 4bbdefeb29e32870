"""Which sequences run next: admit waiting requests while KV blocks and batch slots last, else decode.

A request's blocks are reserved in full when it is admitted (prompt plus max_tokens), so a running
sequence never waits for memory and nothing is ever preempted; a sequence that stops early gives its
blocks back at once, and the next waiting request takes them (continuous batching).
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

    @property
    def prompt_ids(self) -> list[int]:
        return self.sequences[0].prompt_ids


class Scheduler:
    """Keeps the waiting queue and the running set; `schedule()` says what the next step runs."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_prefill_tokens: int):
        self.blocks, self.max_num_seqs, self.max_prefill_tokens = blocks, max_num_seqs, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []

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

    def schedule(self, admit: bool = True) -> tuple[str, list[Request] | list[Sequence]]:
        """("prefill", requests to admit) when admitting and any fit, else ("decode", the running sequences)."""
        admitted: list[Request] = []
        seqs, tokens = len(self.running), 0
        while admit and self.waiting:
            request = self.waiting[0]
            prefill = len(request.prompt_ids) * (1 if request.shared else len(request.sequences))
            if seqs + len(request.sequences) > self.max_num_seqs:
                break
            if admitted and tokens + prefill > self.max_prefill_tokens:
                break
            if not self.blocks.can_allocate(self._blocks_needed(request)):
                break
            self._allocate(self.waiting.popleft())
            admitted.append(request)
            seqs, tokens = seqs + len(request.sequences), tokens + prefill
        if admitted:
            return "prefill", admitted
        return "decode", self.running

    def finish(self, seq: Sequence) -> None:
        """A sequence is done: its blocks go back (shared prompt blocks when the last sibling is done).
        It may not have joined the running set yet (a prefill that failed)."""
        self.blocks.release(seq.block_table)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
