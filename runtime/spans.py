"""Span lengths chosen gap by gap, where a text's span markers allow more combinations than are decoded together.

Coordinate ascent on the score that picks among candidates (log p_AR of the whole filled text):

    every span at its shortest length
    pass: for each gap, left to right: decode every length it allows, the other gaps held ─▶ keep the best
    passes repeat until one changes no length (at most MAX_PASSES)

A combination is decoded once (its score is kept), so a pass costs at most the sum of the markers' lengths, not
their product. Each gap is one round of decoding; the result is the best combination along the way, which need
not be the best of all (MODEL.md measures how often it is where every combination can be decoded).
"""

import math

MAX_PASSES = 3


class GapSearch:
    """The search of one text's span lengths. `pending()` names the combinations to decode next; `scores` takes
    their scores; once `pending()` is empty, `best` holds the chosen lengths."""

    def __init__(self, ranges: list[range]):
        self.ranges = ranges
        self.scores: dict[tuple, float] = {}  # every combination decoded so far -> its score, in that order
        self.best = tuple(r[0] for r in ranges)

    @property
    def combinations(self) -> int:
        return math.prod(len(r) for r in self.ranges)

    def pending(self) -> list[tuple]:
        """Replays the search over the scores known so far: the untried lengths of the gap it stops at, or [] when
        it has ended (self.best then holds its choice)."""
        current = tuple(r[0] for r in self.ranges)
        for _ in range(MAX_PASSES):
            changed = False
            for gap, allowed in enumerate(self.ranges):
                options = [current[:gap] + (n,) + current[gap + 1 :] for n in allowed]
                untried = [lengths for lengths in options if lengths not in self.scores]
                if untried:
                    return untried
                best = max(options, key=self.scores.__getitem__)
                if self.scores[best] > self.scores[current]:  # only a better score moves: it ends
                    current, changed = best, True
            if not changed:
                break
        self.best = current
        return []
