"""A model's weights in transparent huge pages (2 MB on x86-64) for CPU decode.

A decode step reads every activated weight once, so on CPU it runs at the rate the memory streams them. On 4 KB pages
that stream misses the TLB every 4 KB, and each miss walks the page tables (twice over under a hypervisor's nested
paging); on 2 MB pages it hardly misses. Linux gives anonymous memory 2 MB pages everywhere when
/sys/kernel/mm/transparent_hugepage/enabled is `always`, and only where a program asks for them (madvise
MADV_HUGEPAGE) when it is `madvise`, the default of Ubuntu among others; PyTorch's allocator does not ask.

`place(model)` moves a CPU model's parameters and buffers into one anonymous mapping that asks for them: the same
Parameter objects, values and state dict, each tensor's `.data` now a view of the mapping (tensors that shared a
storage, tied weights, still share one). The engine calls it (`Engine(huge_pages=)`, on by default on CPU) and
allocates its KV cache pool with `zeros` (huge pages, and memory taken only as the cache fills); on other systems,
and with NANOSEEK_HUGEPAGES=0, both do nothing.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import weakref
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from nanoseek.kernels import fused

THP = Path("/sys/kernel/mm/transparent_hugepage")


def _huge_page_bytes() -> int:
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _huge_page_bytes()  # 2 MB on x86-64 and on ARM64 with 4 KB pages (512 MB with 64 KB pages)
TRIM_EVERY = 256 << 20  # bytes a move copies between two returns of the heap's free memory (`_trim`)

_mappings: list[tuple[int, int, weakref.ref]] = []  # (first, end address, its mmap) of each empty()


def mode() -> str:
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), or '' where there is none."""
    try:
        text = (THP / "enabled").read_text()
    except OSError:
        return ""
    return text[text.index("[") + 1:text.index("]")] if "[" in text else ""


def supported() -> bool:
    """Whether a mapping here can ask for huge pages (Linux with THP on), and NANOSEEK_HUGEPAGES is not 0."""
    return (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and mode() in ("always", "madvise")
            and os.environ.get("NANOSEEK_HUGEPAGES", "1") != "0")


def empty(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] over a fresh anonymous mapping that asks for huge pages, starting on a 2 MB boundary (check
    `supported()` first). Zero-filled; pages are taken as they are first written. The mapping lives as long as a
    view of it does."""
    m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)  # before the first write: the pages come huge from the start
    whole = torch.frombuffer(m, dtype=torch.uint8)  # its storage holds the mmap object
    _mappings[:] = [e for e in _mappings if e[2]() is not None] + [(whole.data_ptr(), whole.data_ptr() + len(m),
                                                                    weakref.ref(m))]
    start = -whole.data_ptr() % HUGE
    return whole[start:start + nbytes]


def zeros(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor in a mapping of its own that asks for huge pages (`empty`): its memory is taken as it is first
    written, not at allocation (the engine's KV cache pool: `RowStore(zeros=)`)."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return empty(n).view(dtype).view(shape)


def inside(t: torch.Tensor) -> bool:
    """Whether t's storage lies in a live mapping of `empty`."""
    p = t.untyped_storage().data_ptr()
    return any(lo <= p < hi and m() is not None for lo, hi, m in _mappings)


def _movable(t: torch.Tensor) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.layout is torch.strided
            and not t.is_inference() and t.untyped_storage().nbytes() > 0 and not inside(t))


def _by_storage(tensors: Iterable[torch.Tensor]) -> dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]]:
    """The movable tensors (`_movable`) grouped by the storage they view, keyed by its address."""
    storages: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen or not _movable(t):
            continue
        seen.add(id(t))
        st = t.untyped_storage()
        storages.setdefault(st.data_ptr(), (st, []))[1].append(t)
    return storages


def place_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """Move these CPU tensors into one mapping of `empty` (each storage copied once, every tensor of it re-pointed
    at its copy with its offset, shape and strides); returns the bytes moved. Tensors already in such a mapping,
    on another device, or of a subclass stay where they are."""
    return _move(_by_storage(tensors))


def _move(storages: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]]) -> int:
    total = sum(-(-st.nbytes() // 64) * 64 for st, _ in storages.values())
    if not total:
        return 0
    arena = empty(total)
    whole, base, rel, freed = arena.untyped_storage(), arena.storage_offset(), 0, 0  # base: a multiple of 4 KB
    while storages:  # one storage at a time, the old one freed once its tensors point at the copy
        _, (st, ts) = storages.popitem()
        n = st.nbytes()
        arena[rel:rel + n].copy_(torch.empty(0, dtype=torch.uint8).set_(st))
        for t in ts:
            at = (base + rel) // t.element_size() + t.storage_offset()
            t.data = torch.empty(0, dtype=t.dtype).set_(whole, at, t.shape, t.stride())
        del st, ts
        rel += -(-n // 64) * 64
        freed += n
        if freed >= TRIM_EVERY:
            _trim()
            freed = 0
    _trim()
    return total


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def place(model: nn.Module) -> int:
    """Move `model`'s CPU parameters and buffers into huge pages (`place_tensors`); returns the bytes moved. The
    move copies one storage at a time and frees it (then gives the heap's free memory back every TRIM_EVERY
    bytes), so it needs free memory for the largest storage and a little more, not for a second model; nothing
    moves where not `supported()` or where that is not free. The weight caches derived from the old tensors
    (`fused.py`) are dropped; they are rebuilt on their next use."""
    if not supported():
        return 0
    storages = _by_storage([*model.parameters(), *model.buffers()])
    sizes = [st.nbytes() for st, _ in storages.values()]
    if not sizes:
        return 0
    # the move holds, beyond the model, its largest storage and what the heap frees between two trims (all of the
    # model again where malloc cannot give freed memory back)
    extra = max(sizes) + 2 * TRIM_EVERY if _malloc_trim is not None else sum(sizes)
    if extra + (64 << 20) > available_bytes():
        return 0
    fused.forget(model)
    return _move(storages)


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_malloc_trim = _libc_malloc_trim()  # glibc's; None elsewhere


def _trim() -> None:
    """Return the heap's free memory to the system (glibc malloc_trim: tensors below malloc's mmap threshold live in
    its heap, which keeps what is freed)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def mapping_stats(t: torch.Tensor) -> dict:
    """The kernel's account of the mapping holding t (/proc/self/smaps; {} where unknown): its sizes in bytes ("Rss":
    resident, "AnonHugePages": of that, in huge pages, ...) and its "VmFlags" ('hg': it asks for huge pages)."""
    p = t.untyped_storage().data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return {}
    stats, inside_vma = {}, False
    for line in lines:
        head, *rest = line.split()
        if "-" in head and not head.endswith(":"):  # a mapping's first line: its address range
            if stats:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside_vma = lo <= p < hi
        elif inside_vma and head == "VmFlags:":
            stats["VmFlags"] = rest
        elif inside_vma and rest[-1:] == ["kB"]:
            stats[head[:-1]] = int(rest[0]) * 1024
    return stats
