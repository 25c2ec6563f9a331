"""The check that ctypes mirrors of C structs match the structs a C library was compiled with.

Python passes some arguments as structs by pointer (`decode_plan._Block` for `ns_block` of cpu_decode.c). A field
added, moved or retyped on one side only would make the C code read other fields' bytes, silently. Each library
that takes such structs exports their layout as its compiler laid them out:

    const char *ns_abi_fields(int which)             "struct field field ..." for struct `which`, NULL past the last
    int64_t ns_abi(int which, int64_t *out, int64_t n)  out = [sizeof, then each field's offset and size]; returns
                                                      the number of values (-1 past the last struct)

and `check` compares them with the mirrors when the library is loaded: any difference (a struct without a mirror,
a mirror without a struct, the size, the field names in order, an offset or a field's size) raises `AbiMismatch`.
"""
from __future__ import annotations

import ctypes
import itertools


class AbiMismatch(RuntimeError):
    """A ctypes mirror does not match the C struct it stands for."""


def layouts(lib: ctypes.CDLL) -> dict[str, tuple[int, list[tuple[str, int, int]]]]:
    """The library's structs: name -> (sizeof, [(field, offset, size)])."""
    lib.ns_abi_fields.restype = ctypes.c_char_p
    lib.ns_abi_fields.argtypes = [ctypes.c_int]
    lib.ns_abi.restype = ctypes.c_int64
    lib.ns_abi.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    out = {}
    for which in itertools.count():
        names = lib.ns_abi_fields(which)
        if names is None:
            return out
        struct, *fields = names.decode().split()
        n = lib.ns_abi(which, None, 0)
        values = (ctypes.c_int64 * n)()
        lib.ns_abi(which, values, n)
        if n != 1 + 2 * len(fields):
            raise AbiMismatch(f"{struct}: the library reports {len(fields)} fields and {n} layout values")
        out[struct] = (values[0], [(f, values[1 + 2 * i], values[2 + 2 * i]) for i, f in enumerate(fields)])


def mirror_layout(cls: type[ctypes.Structure]) -> tuple[int, list[tuple[str, int, int]]]:
    """A ctypes Structure's layout, as `layouts` gives a C struct's."""
    return ctypes.sizeof(cls), [(name, getattr(cls, name).offset, getattr(cls, name).size)
                                for name, *_ in cls._fields_]


def check(lib: ctypes.CDLL, mirrors: dict[str, type[ctypes.Structure]], what: str) -> None:
    """Raise AbiMismatch unless the library's structs and `mirrors` (C struct name -> its ctypes Structure) are the
    same set, laid out alike. `what` names the library in the message."""
    c = layouts(lib)
    problems = [f"C struct {s} has no ctypes mirror" for s in c if s not in mirrors]
    problems += [f"{cls.__module__}.{cls.__qualname__} mirrors {s}, which the library does not report"
                 for s, cls in mirrors.items() if s not in c]
    for s in c.keys() & mirrors.keys():
        cls = mirrors[s]
        (c_size, c_fields), (p_size, p_fields) = c[s], mirror_layout(cls)
        name = f"{cls.__module__}.{cls.__qualname__} (mirror of {s})"
        if [f for f, *_ in c_fields] != [f for f, *_ in p_fields]:
            problems.append(f"{name}: fields {[f for f, *_ in p_fields]}, the C struct's "
                            f"{[f for f, *_ in c_fields]}")
            continue
        if c_size != p_size:
            problems.append(f"{name}: size {p_size} bytes, the C struct's {c_size}")
        problems += [f"{name}: field {f} at offset {po} ({ps} bytes), in C at {co} ({cs} bytes)"
                     for (f, co, cs), (_, po, ps) in zip(c_fields, p_fields) if (co, cs) != (po, ps)]
    if problems:
        raise AbiMismatch(f"{what}: the ctypes mirrors do not match the C structs (refusing the library): "
                          + "; ".join(problems))
