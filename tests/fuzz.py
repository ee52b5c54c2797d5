"""Seeded random JSON for the fuzz tests of the servers' routes."""

import random


def random_json(rng: random.Random, atoms: list, keys: list, depth: int = 0, deepest: int = 2, leaves: float = 0.5):
    """An atom, or a list or an object of keys (the protocol's own, so the parsers go deep) holding more of them,
    down to `deepest` levels; `leaves` is the chance of an atom above that."""
    pick = rng.random()
    if depth > deepest or pick < leaves:
        return rng.choice(atoms)
    inner = lambda: random_json(rng, atoms, keys, depth + 1, deepest, leaves)  # noqa: E731
    if pick < (1 + leaves) / 2:
        return [inner() for _ in range(rng.randint(0, 3))]
    return {rng.choice(keys): inner() for _ in range(rng.randint(0, 4))}
