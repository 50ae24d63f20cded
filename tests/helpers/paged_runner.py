"""Drive a CausalLM through a paged KV cache by hand, the way the engine does, for model tests.

Each sequence gets consecutive blocks, starting at block 1 (block 0 is the padding value of block
tables, so a test that reads it by mistake sees zeros that are not its own):

    seq 0: blocks 1 2 3        seq 1: blocks 4 5        (block_size 16)
    token at position p of seq 1 -> slot blocks[p // 16] * 16 + p % 16
"""

from __future__ import annotations

import torch
from spindle_server.layers.attention import AttentionMetadata


class PagedRunner:
    def __init__(self, model, world_size: int = 1, num_blocks: int = 64, block_size: int = 16) -> None:
        config = model.config
        self.model = model
        self.block_size = block_size
        kv_heads = config.kv_heads_per_rank(world_size)
        shape = (num_blocks, block_size, kv_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        self.num_blocks = num_blocks
        self.next_block = 1
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def add_sequence(self, seq_id: int, max_len: int) -> None:
        n = -(-max_len // self.block_size)
        assert self.next_block + n <= self.num_blocks, "test cache too small"
        self.blocks[seq_id] = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        self.lens[seq_id] = 0

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """One forward over the new tokens of each (seq_id, tokens); returns per-chunk logits [len, V]."""
        ids, positions, slots, cu, ctx = [], [], [], [0], []
        for seq_id, tokens in chunks:
            start = self.lens[seq_id]
            for i, tok in enumerate(tokens):
                p = start + i
                ids.append(tok)
                positions.append(p)
                slots.append(
                    self.blocks[seq_id][p // self.block_size] * self.block_size + p % self.block_size
                )
            cu.append(cu[-1] + len(tokens))
            ctx.append(start + len(tokens))
        max_blocks = max(len(self.blocks[s]) for s, _ in chunks)
        table = torch.zeros(len(chunks), max_blocks, dtype=torch.int32)
        for row, (seq_id, _) in enumerate(chunks):
            table[row, : len(self.blocks[seq_id])] = torch.tensor(self.blocks[seq_id], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=table,
            max_q_len=max(len(t) for _, t in chunks),
            is_decode=all(len(t) == 1 for _, t in chunks),
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.int64), torch.tensor(positions), self.kv_caches, meta
        )
        logits = self.model.compute_logits(hidden)
        for seq_id, tokens in chunks:
            self.lens[seq_id] += len(tokens)
        return [logits[cu[i] : cu[i + 1]] for i in range(len(chunks))]
