"""Generation by simulated annealing with MARIA (the paper's unconditional generation, its Figure 5).

    start:   every free position masked, filled by MARIA (one-shot sampling)           energy E = -log p_AR(text)
    step k:  re-mask a random fraction f_k of the free positions, refill them with MARIA given the rest,
             accept the proposal with probability min(1, exp(-(E_new - E) / T_k))      (Metropolis)
    keep:    the lowest-energy text seen

f_k and T_k fall geometrically from their start to their end values over the K steps. N samples advance
together, through the decode engine's slots; sample j draws from generators of (seed, j, k).
"""

import math
from dataclasses import dataclass, field

import numpy as np

from .choose import Sampling
from .likelihood import ar_loglikelihood


@dataclass(frozen=True)
class Schedule:
    steps: int = 16
    fraction_start: float = 0.5          # share of the free positions re-masked at the first step
    fraction_end: float = 0.1            # ... and at the last
    temperature_start: float = 1.0       # Metropolis temperature (nats) at the first step
    temperature_end: float = 0.05        # ... and at the last

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        for option, value in (("--fraction-start", self.fraction_start), ("--fraction-end", self.fraction_end)):
            if not 0 < value <= 1:
                raise ValueError(f"{option} is a share of the generated tokens, in (0, 1], got {value}")
        for option, value in (("--anneal-start", self.temperature_start), ("--anneal-end", self.temperature_end)):
            if not 0 < value < math.inf:
                raise ValueError(f"{option} is a Metropolis temperature, a finite number > 0, got {value}")

    def _at(self, start: float, end: float, step: int) -> float:
        """Geometric interpolation, step 1 -> start, step K -> end."""
        share = 0.0 if self.steps <= 1 else (step - 1) / (self.steps - 1)
        return start * (end / start) ** share

    def fraction(self, step: int) -> float:
        return self._at(self.fraction_start, self.fraction_end, step)

    def temperature(self, step: int) -> float:
        return self._at(self.temperature_start, self.temperature_end, step)


@dataclass
class Annealed:
    """One sample: the best text found, its ids and energy, and the energy kept after every step."""
    text: str
    ids: list
    energy: float                        # -log p_AR of the best text
    energies: list = field(default_factory=list)     # current energy after step 0, 1, .., K
    best_energies: list = field(default_factory=list)
    accepted: int = 0

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": self.ids, "energy": self.energy, "energies": self.energies,
                "best_energies": self.best_energies, "accepted": self.accepted}


def _energies(infiller, ids: list[np.ndarray]) -> np.ndarray:
    return -np.array(ar_loglikelihood(infiller.backend, ids, infiller.special))


def anneal(infiller, prefix: np.ndarray, suffix: np.ndarray, length: int, num_samples: int, schedule: Schedule,
           sampling: Sampling = Sampling(temperature=1.0), seed: int = 0, on_step=None,
           batch_size: int | None = None, first_sample: int = 0) -> list[Annealed]:
    """Generates `length` tokens between prefix and suffix (content ids) for num_samples samples, batch_size of
    them decoded at once (default: all; the others wait for a free slot, with the same fills). Samples are
    numbered from first_sample (their generators with them), so samples can be generated a group at a time.
    on_step(step, energies) is called after the start and after every step."""
    if length < 1 or num_samples < 1:
        raise ValueError(f"--length and --num-samples must be at least 1, got {length}, {num_samples}")
    if len(prefix) + length + len(suffix) > infiller.manifest.max_sequence_length:
        raise ValueError(f"prefix, {length} tokens and suffix make {len(prefix) + length + len(suffix)} tokens, "
                         f"over the bundle's maximum of {infiller.manifest.max_sequence_length}")
    free = np.arange(len(prefix), len(prefix) + length)
    template = np.concatenate([prefix, np.full(length, infiller.special.mask), suffix]).astype(np.int64)
    masked = np.zeros(len(template), dtype=bool)
    masked[free] = True
    rngs = lambda step: [np.random.default_rng([seed, first_sample + sample, step])
                         for sample in range(num_samples)]
    slots = min(num_samples, batch_size or num_samples)
    fills = infiller.fill_ids([template] * num_samples, [masked] * num_samples, sampling, slots, rngs(0))
    current = [f.ids for f in fills]
    energy = _energies(infiller, current)
    best, best_energy = list(current), energy.copy()
    history, best_history, accepted = [energy.tolist()], [best_energy.tolist()], np.zeros(num_samples, dtype=int)
    if on_step:
        on_step(0, energy)
    for step in range(1, schedule.steps + 1):
        step_rngs = rngs(step)
        count = max(1, round(schedule.fraction(step) * length))
        remask = [np.zeros(len(template), dtype=bool) for _ in range(num_samples)]
        for sample, flags in enumerate(remask):
            flags[step_rngs[sample].choice(free, size=count, replace=False)] = True
        proposals = [f.ids for f in infiller.fill_ids(
            [np.where(m, infiller.special.mask, x) for x, m in zip(current, remask)], remask, sampling,
            slots, step_rngs)]
        proposed = _energies(infiller, proposals)
        threshold = np.exp(np.minimum(0.0, -(proposed - energy) / schedule.temperature(step)))
        accept = np.array([rng.random() for rng in step_rngs]) < threshold
        for sample in np.flatnonzero(accept):
            current[sample], energy[sample] = proposals[sample], proposed[sample]
            if energy[sample] < best_energy[sample]:
                best[sample], best_energy[sample] = proposals[sample], energy[sample]
        accepted += accept
        history.append(energy.tolist())
        best_history.append(best_energy.tolist())
        if on_step:
            on_step(step, energy)
    decode = lambda ids: infiller.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    return [Annealed(text=decode(best[s]), ids=best[s].tolist(), energy=float(best_energy[s]),
                     energies=[h[s] for h in history], best_energies=[h[s] for h in best_history],
                     accepted=int(accepted[s])) for s in range(num_samples)]
