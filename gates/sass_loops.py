"""Loops of a SASS listing: where they are and what their bodies cost.

A loop in SASS is a backward branch: ``BRA`` (possibly predicated, ``@P0 BRA``
or ``@!UP1 BRA``) at address ``end`` to a target ``start <= end``; its body is
every instruction from ``start`` to ``end``. An *innermost* loop contains no
other loop. The main loop of a streaming kernel is its largest innermost loop,
and its instruction count divided by the work one trip does (weights per
thread, for a GEMV) is the static cost the kernel report compares between
kernel versions: ``main_loop(sass).instructions / weights_per_trip``.

Input is ``cuobjdump -sass`` / ``nvdisasm`` text: one instruction per line
as ``/*0120*/  OPCODE operands ;``. ``NOP`` padding is not counted.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

_LINE = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+([^;]*?)\s*;")
_BRANCH = re.compile(r"^(?:@!?U?P[T0-9]+\s+)?BRA(?:\.[A-Z0-9_]+)*\s+(?:!?U?P[T0-9]+\s*,\s*)?(0x[0-9a-fA-F]+)")


@dataclass(frozen=True)
class SassLoop:
    """One backward branch: its body spans addresses ``start`` .. ``end`` (the branch itself)."""

    start: int
    end: int
    body: tuple[str, ...]  # instruction texts in address order, NOPs left out

    @property
    def instructions(self) -> int:
        return len(self.body)

    def opcodes(self) -> Counter:
        """How often each opcode (the mnemonic without modifiers or predicate) occurs in the body."""
        return Counter(_mnemonic(text) for text in self.body)

    def contains(self, other: "SassLoop") -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end and \
            (self.start, self.end) != (other.start, other.end)


def _mnemonic(text: str) -> str:
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text) of every instruction line of the listing."""
    return [(int(address, 16), text.strip()) for address, text in _LINE.findall(sass)]


def loops(sass: str) -> list[SassLoop]:
    """Every backward branch of the listing as a loop, in address order of the branch."""
    lines = instructions(sass)
    found = []
    for address, text in lines:
        branch = _BRANCH.match(text)
        if branch is None:
            continue
        target = int(branch.group(1), 16)
        if target > address:
            continue
        body = tuple(t for a, t in lines if target <= a <= address and _mnemonic(t) != "NOP")
        found.append(SassLoop(target, address, body))
    return found


def innermost_loops(sass: str) -> list[SassLoop]:
    """The loops that contain no other loop."""
    every = loops(sass)
    return [loop for loop in every if not any(loop.contains(other) for other in every)]


def main_loop(sass: str) -> Optional[SassLoop]:
    """The innermost loop with the most instructions (the first of equals); None without loops."""
    best = None
    for loop in innermost_loops(sass):
        if best is None or loop.instructions > best.instructions:
            best = loop
    return best


def instructions_per_item(sass: str, items_per_trip: int) -> float:
    """Instructions of the main loop divided by the items (e.g. weights per thread) one trip processes."""
    if items_per_trip <= 0:
        raise ValueError(f"items_per_trip must be positive, got {items_per_trip}")
    loop = main_loop(sass)
    if loop is None:
        raise ValueError("the SASS listing has no loop (no backward branch)")
    return loop.instructions / items_per_trip
