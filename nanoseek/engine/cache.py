"""Paged latent KV cache: a pool of fixed-size blocks shared by all requests, with prefix caching.

MLA caches per token and layer one latent row of C = kv_lora_rank + qk_rope_head_dim values (DeepSeek-V2 §2.1.2),
plus the lightning indexer's key (I = index_head_dim values) on DSA models (V3.2 §2.1). The pool holds, for every
layer, `num_blocks * block_size` such rows; a request owns a list of blocks (its block table), so requests of any
length share one budget without fragmentation (the PagedAttention idea, Kwon et al. 2023). With a `kv_format`
(--kv-cache-dtype fp8 | int8) the rows are stored in 8 bits and dequantized on read (`nanoseek.model.kv_quant`;
the whole-stack CPU decode reads the 8-bit planes in place, `CacheView.slots`), so the same budget holds about
twice the tokens.

Prefix caching: a full block is identified by a hash chained over all token ids up to its end (plus `lookahead`
following tokens when the MTP layers are cached too: their row i also depends on token i+1). Finished requests
leave their hashed blocks in the pool with reference count 0; a later request with the same prefix takes them
again, and a block is only overwritten (evicted) when no free unhashed block is left, least recently freed first.

`CacheView` is the `nanoseek.model.cache.LatentCache` for one forward call over a batch of requests that each
append a different number of tokens at a different offset. Padded query slots write into the reserved null block
0 and copy the mask of their request's last real token, so they never touch real rows nor produce NaNs.

Legend: B batch, T new tokens (padded), S visible rows (padded), C latent row width, I indexer key width,
K selected rows, L cached layers.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from nanoseek.kernels import hugepages
from nanoseek.model.kv_quant import KVFormat, RowStore

NULL_BLOCK = 0  # never handed out: padded writes land here


class BlockPool:
    """Block storage for L layers plus the allocator (free list in LRU order, reference counts, prefix hashes)."""

    def __init__(self, cfg, num_layers: int, block_size: int, cache_bytes: int, dtype: torch.dtype,
                 device, lookahead: int = 0, kv_format: Optional[KVFormat] = None, huge_pages: bool = False):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.num_layers, self.lookahead = block_size, num_layers, lookahead
        self.kv_format = kv_format
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.index_width = cfg.index_head_dim if cfg.use_dsa else 0
        self.num_blocks = int(cache_bytes // self.bytes_per_block(cfg, num_layers, block_size, dtype, kv_format))
        if self.num_blocks < 2:
            raise ValueError(f"cache budget of {cache_bytes} bytes holds fewer than 2 blocks of {block_size} tokens")
        n = self.num_blocks * block_size
        # [L, slots, C] latent rows [c_kv ; k_pe] and [L, slots, I] indexer keys; huge_pages (CPU): in huge pages,
        # taken as the cache fills (kernels/hugepages.py)
        huge = huge_pages and torch.device(device).type == "cpu" and hugepages.supported()
        zeros = hugepages.zeros if huge else None
        self.rows = RowStore(num_layers, (n,), (cfg.kv_lora_rank, cfg.qk_rope_head_dim), dtype, device, kv_format,
                             zeros)
        self.index_rows = (RowStore(num_layers, (n,), (self.index_width,), dtype, device, kv_format, zeros)
                           if self.index_width else None)
        self.device = self.rows.device
        self.ref = [0] * self.num_blocks
        self.block_hash: list[Optional[bytes]] = [None] * self.num_blocks
        self.cached: dict[bytes, int] = {}  # prefix hash -> block id
        # free blocks, evicted from the front: unhashed blocks are put first, hashed ones last (LRU among them)
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, self.num_blocks))

    @staticmethod
    def bytes_per_block(cfg, num_layers: int, block_size: int, dtype: torch.dtype,
                        kv_format: Optional[KVFormat] = None) -> int:
        per_row = RowStore.bytes_per_row((cfg.kv_lora_rank, cfg.qk_rope_head_dim), dtype, kv_format)
        if cfg.use_dsa:
            per_row += RowStore.bytes_per_row((cfg.index_head_dim,), dtype, kv_format)
        return num_layers * block_size * per_row

    # ---- accounting ------------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / (self.num_blocks - 1)

    # ---- allocation ------------------------------------------------------------------------------------
    def _take(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:  # evict: its rows are about to be overwritten
            del self.cached[h]
            self.block_hash[b] = None
        self.ref[b] = 1
        return b

    def grow(self, table: list[int], num_rows: int) -> bool:
        """Append blocks to `table` until it holds num_rows rows. All or nothing; False when the pool is short."""
        need = -(-num_rows // self.block_size) - len(table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def release(self, table: list[int]) -> None:
        """Drop a request's hold on its blocks (tail first, so a prefix outlives its continuations)."""
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    self.free.move_to_end(b, last=False)
        table.clear()

    # ---- prefix caching --------------------------------------------------------------------------------
    def block_hashes(self, tokens: Sequence[int], start_block: int, parent: bytes, limit: int) -> list[bytes]:
        """Chained hashes of the full blocks start_block.. whose tokens (plus lookahead) lie within tokens[:limit]."""
        bs, out = self.block_size, []
        j = start_block
        while (j + 1) * bs + self.lookahead <= limit:
            chunk = tokens[j * bs:(j + 1) * bs + self.lookahead]
            parent = hashlib.blake2b(parent + b"|" + ",".join(map(str, chunk)).encode(), digest_size=16).digest()
            out.append(parent)
            j += 1
        return out

    def match_prefix(self, tokens: Sequence[int], table: list[int]) -> tuple[int, list[bytes]]:
        """Take the cached blocks that begin `tokens` (leaving at least one token to compute) into the empty
        `table`. Returns (cached token count, hashes of the taken blocks)."""
        hashes = self.block_hashes(tokens, 0, b"", len(tokens) - 1)
        taken = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
            table.append(b)
            taken.append(h)
        return len(taken) * self.block_size, taken

    def register(self, table: list[int], hashes: list[bytes], tokens: Sequence[int], num_valid: int) -> None:
        """Hash the request's full blocks whose rows are all valid (num_valid rows computed) for reuse."""
        parent = hashes[-1] if hashes else b""
        limit = min(len(tokens), num_valid + self.lookahead)
        for h in self.block_hashes(tokens, len(hashes), parent, limit):
            b = table[len(hashes)]
            hashes.append(h)
            if h not in self.cached and self.block_hash[b] is None:
                self.cached[h] = b
                self.block_hash[b] = h


class CacheView:
    """The LatentCache of one forward call: request b appends num_new[b] tokens after its starts[b] cached rows.

    Built once per call (the slot arithmetic is shared by all layers); counts the rows it reads in `rows_read`.
    """

    def __init__(self, pool: BlockPool, tables: Sequence[list[int]], starts: Sequence[int],
                 num_new: Sequence[int]):
        dev, bs = pool.device, pool.block_size
        self.pool = pool
        self.kv_format = pool.kv_format  # an 8-bit cache has no plain planes for `slots`
        B, T = len(tables), max(num_new)
        lengths = [s + n for s, n in zip(starts, num_new)]
        S = max(lengths)
        nb = -(-S // bs)
        # the per-query quantities (B*T values) are built in Python and sent as one tensor each: a decode step
        # is bound by the number of small ops. Padded queries repeat the last real position (same mask, so no
        # all-masked softmax rows) and write to the null block.
        pos = [[s + min(t, n - 1) for t in range(T)] for s, n in zip(starts, num_new)]  # [B, T]
        write = [tab[p // bs] * bs + p % bs if t < n else 0
                 for tab, row, n in zip(tables, pos, num_new) for t, p in enumerate(row)]  # [B*T]
        self._tables, self._nb, self._S = tables, nb, S
        self._read_slots: Optional[torch.Tensor] = None
        self.write_slots = torch.tensor(write, dtype=torch.long, device=dev)
        self.positions = torch.tensor(pos, dtype=torch.long, device=dev)
        self.num_visible = S  # the mask's width: rows any query sees
        self._mask: Optional[torch.Tensor] = None
        self.rows_read = 0
        # one request whose blocks happen to be consecutive: reads are views of the pool, not copies
        t0 = tables[0][:nb]
        self._span = None
        if B == 1 and len(t0) == nb and t0[-1] - t0[0] == nb - 1 and t0 == list(range(t0[0], t0[0] + nb)):
            self._span = slice(t0[0] * bs, t0[0] * bs + S)

    # the mask is by position: the whole-stack CPU decode (`decode_plan`) builds it from `positions` in its kernel
    causal_positions = True

    @property
    def mask(self) -> torch.Tensor:
        """[B, T, S] bool: query (b, t) sees row s where s <= its position. Built on first use."""
        if self._mask is None:
            S = self.num_visible
            self._mask = torch.arange(S, device=self.positions.device)[None, None, :] <= self.positions[:, :, None]
        return self._mask

    @property
    def read_slots(self) -> torch.Tensor:
        """[B, S] pool slot of each row position (past a request's length: a row of its last block or of the null
        block, which the mask hides). Built on first use: a single request whose blocks are consecutive reads
        views of the pool and never needs it."""
        if self._read_slots is None:
            bs, nb = self.pool.block_size, self._nb
            slots = (self.block_tables()[:, :, None] * bs + torch.arange(bs)).view(len(self._tables), nb * bs)
            self._read_slots = slots[:, :self._S].to(self.pool.device)
        return self._read_slots

    def block_tables(self) -> torch.Tensor:
        """[B, nb] int64 on the CPU: the blocks holding each request's S rows (padded with the null block)."""
        nb = self._nb
        return torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in self._tables], dtype=torch.long)

    def write(self, layer: int, kv: torch.Tensor, index_k: Optional[torch.Tensor]) -> None:
        self.pool.rows.write(layer, self.write_slots, kv.reshape(-1, kv.shape[-1]))
        if index_k is not None:
            self.pool.index_rows.write(layer, self.write_slots, index_k.reshape(-1, index_k.shape[-1]))

    def read(self, layer: int) -> torch.Tensor:
        self.rows_read += len(self._tables) * self._S
        if self._span is not None:
            return self.pool.rows.read(layer, self._span)[None]
        return self.pool.rows.take(layer, self.read_slots)  # [B, S, C]

    def slots(self, full_layers: int, gathered: int = 0):
        """The cache as pools of rows for `decode_plan`: (kv, index_k or None, write slots [B*T], the reads: the
        block tables and the block size (`block_tables`; the kernel computes the slots), or None with the first
        row's slot when one request's rows are contiguous), kv and index_k the stores' `RowStore.planes` (values
        [L, slots, C or I], scales [L, slots, G] or None). Counts the caller's reads: full_layers layers that read
        every row, and `gathered` rows that DSA's selection reads in the others."""
        self.rows_read += full_layers * len(self._tables) * self._S + gathered
        kv = self.pool.rows.planes()
        ik = self.pool.index_rows.planes() if self.pool.index_rows is not None else None
        if self._span is not None:
            return kv, ik, self.write_slots, None, self._span.start
        return kv, ik, self.write_slots, (self.block_tables(), self.pool.block_size), 0

    def read_index_keys(self, layer: int) -> torch.Tensor:
        if self._span is not None:
            return self.pool.index_rows.read(layer, self._span)[None]
        return self.pool.index_rows.take(layer, self.read_slots)  # [B, S, I]

    def gather(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        B, T, K = idx.shape
        slots = torch.gather(self.read_slots, 1, idx.reshape(B, T * K)).view(B, T, K)
        self.rows_read += slots.numel()
        return self.pool.rows.take(layer, slots)  # [B, T, K, C]
