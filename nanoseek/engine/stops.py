"""Incremental stop-string matching: each step costs what the new text costs, whatever the text or stop length.

A request's stop strings are compiled once into Knuth-Morris-Pratt failure tables (`StopStrings`, built with the
SamplingParams, i.e. on the caller's thread, not the engine's); each sequence keeps one matched length per stop
string (`StopState`): the longest prefix of that stop string the text ends with. Feeding the characters a step
added walks each table from that length (amortised O(1) per character), which answers both questions the engine
asks per step:
- did a stop string end in the new text, and where does the earliest one start (the text is cut there);
- how many trailing characters could still become a stop string (held back from the stream until they cannot).
Re-scanning the text or re-testing every prefix of every stop string instead costs text or stop length squared
per step (16 stop strings of 8k characters: ~120 ms a step).
"""
from __future__ import annotations

from typing import Optional, Sequence


def _failure(s: str) -> list[int]:
    """fail[q]: the longest proper prefix of s[:q] that is also its suffix (q = 0..len(s))."""
    fail = [0] * (len(s) + 1)
    k = 0
    for q in range(1, len(s)):
        while k and s[q] != s[k]:
            k = fail[k]
        if s[q] == s[k]:
            k += 1
        fail[q + 1] = k
    return fail


class StopStrings:
    """The compiled stop strings of one SamplingParams (immutable; shared by its sequences)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.tables = [_failure(s) for s in self.stops]

    def state(self) -> "StopState":
        return StopState(self)


class StopState:
    """One sequence's progress through its stop strings."""

    def __init__(self, compiled: StopStrings):
        self.compiled = compiled
        self.matched = [0] * len(compiled.stops)

    def feed(self, text: str, start: int) -> Optional[int]:
        """Advance over text[start:] (the characters added since the last call). Returns where the earliest stop
        string found in them starts (an index into text; it may start before `start`), or None."""
        first: Optional[int] = None
        for j, (s, fail) in enumerate(zip(self.compiled.stops, self.compiled.tables)):
            q, n = self.matched[j], len(s)
            for i in range(start, len(text)):
                c = text[i]
                while q and s[q] != c:
                    q = fail[q]
                if s[q] == c:
                    q += 1
                if q == n:  # a whole stop string ends at i; keep scanning (overlaps) from its longest border
                    if first is None or i - n + 1 < first:
                        first = i - n + 1
                    q = fail[n]
            self.matched[j] = q
        return first

    def held(self) -> int:
        """Trailing characters that are a proper prefix of some stop string (not to be streamed yet)."""
        return max(self.matched, default=0)
