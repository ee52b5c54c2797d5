"""Generation by simulated annealing with MARIA (the paper's unconditional generation, its Figure 5).

    start:   every free position masked, filled by MARIA (one-shot sampling)           energy E = -log p_AR(text)
    step k:  re-mask a random fraction f_k of the free positions, refill them with MARIA given the rest,
             accept the proposal with probability min(1, exp(-(E_new - E) / T_k))      (Metropolis)
    keep:    the lowest-energy text seen

f_k and T_k fall geometrically from their start to their end values over the K steps. N samples advance
together, through the decode engine's slots; sample j draws from generators of (seed, j, k). Annealing is one
round of decode rows a step, filled by anneal() here or by maria serve's decode worker (serve/continuous.py).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .choose import Sampling
from .driver import Decoder, Filler, RoundDriver, fill_rounds
from .errors import SettingError
from .likelihood import ar_loglikelihood
from .requests import SettingTypeError, typed_settings
from .text import MaskedText


@dataclass(frozen=True)
class Schedule:
    steps: int = 16
    fraction_start: float = 0.5  # share of the free positions re-masked at the first step
    fraction_end: float = 0.1  # ... and at the last
    temperature_start: float = 1.0  # Metropolis temperature (nats) at the first step
    temperature_end: float = 0.05  # ... and at the last

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise SettingError(f"{{steps}} must be >= 0, got {self.steps}", "steps")
        for name, value in (("fraction_start", self.fraction_start), ("fraction_end", self.fraction_end)):
            if not 0 < value <= 1:
                raise SettingError(f"{{{name}}} is a share of the generated tokens, in (0, 1], got {value}", name)
        for name, value in (("anneal_start", self.temperature_start), ("anneal_end", self.temperature_end)):
            if not 0 < value < math.inf:
                raise SettingError(f"{{{name}}} is a Metropolis temperature, a finite number > 0, got {value}", name)

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
    energy: float  # -log p_AR of the best text
    energies: list = field(default_factory=list)  # current energy after step 0, 1, .., K
    best_energies: list = field(default_factory=list)
    accepted: int = 0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "ids": self.ids,
            "energy": self.energy,
            "energies": self.energies,
            "best_energies": self.best_energies,
            "accepted": self.accepted,
        }


@dataclass(frozen=True)
class AnnealRow:
    """One decode row of a step: sample `sample`'s text with the positions to refill masked."""

    sample: int
    encoded: MaskedText
    rng: np.random.Generator


@dataclass(frozen=True)
class AnnealRequest:
    """What maria generate asks for: `length` tokens between prefix and suffix (content ids), num_samples samples
    (sample j drawing from generators of (sampling.seed, j, step))."""

    prefix: np.ndarray
    suffix: np.ndarray
    length: int
    num_samples: int = 1
    schedule: Schedule = Schedule()
    sampling: Sampling = Sampling(temperature=1.0)

    def start(self, filler: Filler) -> "Annealing":
        return Annealing(filler, self)


class Annealing:
    """One annealing run as rounds of decode rows, one round a step: `rows` to fill (one per sample), `collect`
    takes their fills and returns the next step's rows ([] after the last), then `results` holds the samples.
    Sample j draws its re-masked positions, its fills and its acceptance from one generator of (seed, j, step),
    in that order, so any driver that fills the rows gives the same samples (anneal() below; maria serve's
    decode worker)."""

    def __init__(
        self,
        filler: Filler,
        request: AnnealRequest,
        first_sample: int = 0,
        on_step: Callable[[int, np.ndarray], None] | None = None,
    ) -> None:
        prefix, suffix, length, num_samples = request.prefix, request.suffix, request.length, request.num_samples
        self.check(filler, prefix, suffix, length, num_samples)
        self.filler, self.schedule, self.sampling, self.on_step = filler, request.schedule, request.sampling, on_step
        self.seed, self.first_sample, self.num_samples, self.step = request.sampling.seed, first_sample, num_samples, 0
        self.free = np.arange(len(prefix), len(prefix) + length)
        template = np.concatenate([prefix, np.full(length, filler.special.mask), suffix]).astype(np.int64)
        masked = np.zeros(len(template), dtype=bool)
        masked[self.free] = True
        self.rngs = self._rngs(0)
        self.rows = [AnnealRow(s, MaskedText(template, masked), rng) for s, rng in enumerate(self.rngs)]
        self.results: list[Annealed] = []

    @staticmethod
    def check(filler: Filler, prefix: np.ndarray, suffix: np.ndarray, length: int, num_samples: int) -> None:
        """ValueError for a run the model cannot make."""
        if length < 1 or num_samples < 1:
            raise SettingError(
                f"{{length}} and {{num_samples}} must be at least 1, got {length}, {num_samples}",
                "length",
                "num_samples",
            )
        if len(prefix) + length + len(suffix) > filler.max_sequence_length:
            raise ValueError(
                f"prefix, {length} tokens and suffix make {len(prefix) + length + len(suffix)} "
                f"tokens, over the bundle's maximum of {filler.max_sequence_length}"
            )

    def _rngs(self, step: int) -> list:
        return [
            np.random.default_rng([self.seed, self.first_sample + sample, step]) for sample in range(self.num_samples)
        ]

    def _energies(self, ids: list[np.ndarray]) -> np.ndarray:
        return -np.array(ar_loglikelihood(self.filler.backend, ids, self.filler.special))

    def collect(self, fills: list) -> list[AnnealRow]:
        """Takes the fills of `rows` (in order): the start, or a step's proposals accepted by the Metropolis
        rule; returns the next step's rows."""
        proposals = [f.ids for f in fills]
        proposed = self._energies(proposals)
        if self.step == 0:
            self.current, self.energy = proposals, proposed
            self.best, self.best_energy = list(proposals), proposed.copy()
            self.history, self.best_history = [proposed.tolist()], [proposed.tolist()]
            self.accepted = np.zeros(self.num_samples, dtype=int)
        else:
            threshold = np.exp(np.minimum(0.0, -(proposed - self.energy) / self.schedule.temperature(self.step)))
            accept = np.array([rng.random() for rng in self.rngs]) < threshold
            for sample in np.flatnonzero(accept):
                self.current[sample], self.energy[sample] = proposals[sample], proposed[sample]
                if self.energy[sample] < self.best_energy[sample]:
                    self.best[sample], self.best_energy[sample] = proposals[sample], self.energy[sample]
            self.accepted += accept
            self.history.append(self.energy.tolist())
            self.best_history.append(self.best_energy.tolist())
        if self.on_step:
            self.on_step(self.step, self.energy)
        self.step += 1
        self.rows = self._remasked() if self.step <= self.schedule.steps else []
        if not self.rows:
            self._finish()
        return self.rows

    def _remasked(self) -> list[AnnealRow]:
        """Step k's rows: a fraction f_k of each sample's free positions re-masked."""
        self.rngs = self._rngs(self.step)
        count = max(1, round(self.schedule.fraction(self.step) * len(self.free)))
        rows = []
        for sample, (ids, rng) in enumerate(zip(self.current, self.rngs)):
            remask = np.zeros(len(ids), dtype=bool)
            remask[rng.choice(self.free, size=count, replace=False)] = True
            rows.append(AnnealRow(sample, MaskedText(np.where(remask, self.filler.special.mask, ids), remask), rng))
        return rows

    def _finish(self) -> None:
        tokenizer = self.filler.tokenizer
        self.results = [
            Annealed(
                text=tokenizer.decode(self.best[s].tolist(), skip_special_tokens=False),
                ids=self.best[s].tolist(),
                energy=float(self.best_energy[s]),
                energies=[h[s] for h in self.history],
                best_energies=[h[s] for h in self.best_history],
                accepted=int(self.accepted[s]),
            )
            for s in range(self.num_samples)
        ]


def encode_ends(filler: Filler, prefix: str, suffix: str) -> tuple[np.ndarray, np.ndarray]:
    """The content ids of the plain text before and after the generated tokens; ValueError naming the option
    whose text the model refuses."""
    if "[MASK" in prefix + suffix:
        raise SettingError(
            "{prefix} and {suffix} are plain text; the generated tokens go between them", "prefix", "suffix"
        )

    def encode(text: str, field: str) -> np.ndarray:
        try:
            return filler.encode(text).ids if text else np.zeros(0, dtype=np.int64)
        except ValueError as error:
            raise SettingError(f"{{{field}}}: {error}", field) from None

    return encode(prefix, "prefix"), encode(suffix, "suffix")


# maria serve's /v1/generate: maria generate's options as JSON fields (length is required)
GENERATE_SETTINGS = {
    "length": int,
    "prefix": str,
    "suffix": str,
    "steps": int,
    "num_samples": int,
    "seed": int,
    "temperature": float,
    "top_p": float,
    "fraction_start": float,
    "fraction_end": float,
    "anneal_start": float,
    "anneal_end": float,
}


def anneal_request(filler: Filler, given: dict) -> AnnealRequest:
    """The request of maria generate's options given as JSON fields (GENERATE_SETTINGS; the CLI's defaults).
    SettingTypeError for an unknown field or a wrong type, ValueError for a value the model refuses, with the
    field's name."""
    values = typed_settings(given, GENERATE_SETTINGS)
    if "length" not in values:
        raise SettingTypeError(
            f'the request has no "length" field: send {{"length": N, ...}}, the tokens to '
            f"generate, with optional fields {', '.join(list(GENERATE_SETTINGS)[1:])}"
        )
    schedule = Schedule(
        values.get("steps", 16),
        values.get("fraction_start", 0.5),
        values.get("fraction_end", 0.1),
        values.get("anneal_start", 1.0),
        values.get("anneal_end", 0.05),
    )
    sampling = Sampling(
        temperature=values.get("temperature", 1.0), top_p=values.get("top_p", 1.0), seed=values.get("seed", 0)
    )
    prefix, suffix = encode_ends(filler, values.get("prefix", ""), values.get("suffix", ""))
    request = AnnealRequest(prefix, suffix, values["length"], values.get("num_samples", 1), schedule, sampling)
    Annealing.check(filler, request.prefix, request.suffix, request.length, request.num_samples)
    return request


def anneal(
    filler: Filler,
    request: AnnealRequest,
    on_step: Callable[[int, np.ndarray], None] | None = None,
    batch_size: int | None = None,
    first_sample: int = 0,
) -> list[Annealed]:
    """Generates request.length tokens between its prefix and suffix for its num_samples samples, batch_size of
    them decoded at once (default: all; the others wait for a free slot, with the same fills). Samples are
    numbered from first_sample (their generators with them), so samples can be generated a group at a time.
    on_step(step, energies) is called after the start and after every step."""
    annealing = Annealing(filler, request, first_sample, on_step)
    slots = min(request.num_samples, batch_size or request.num_samples)
    return run_annealing(filler.new_decoder(slots), annealing)


def run_annealing(
    decoder: Decoder,
    annealing: Annealing,
    on_batch: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> list[Annealed]:
    """Fills annealing's rows step after step through the round driver (the decoder's slots bound how many run
    at once; the others wait for a free slot); on_batch(rows, ns) hears each step once it is filled. Where cancelled()
    turns true, it stops before the next step and returns no results."""
    finished = fill_rounds(RoundDriver(decoder), [(annealing, annealing.sampling, None)], on_batch, cancelled)
    return annealing.results if finished else []
