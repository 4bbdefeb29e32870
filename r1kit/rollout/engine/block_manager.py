"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prompt blocks shared by a group."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out KV blocks. A block shared by several sequences is freed when its last user lets go."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold this many tokens."""
        return -(-tokens // self.block_size)

    def can_allocate(self, blocks: int) -> bool:
        return len(self.free) >= blocks

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks, each with one reference."""
        if count > len(self.free):
            raise RuntimeError(f"KV cache full: {count} blocks wanted, {len(self.free)} free")
        blocks = [self.free.popleft() for _ in range(count)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Another reference to each block (a group member pointing at the prompt's full blocks)."""
        for b in blocks:
            self.refs[b] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody uses go back to the free list."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)
