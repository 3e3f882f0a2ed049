"""Memory budgets that change over time: contention traces and the budget predictor (SPEC 3.2).

A client's usable memory is its *capacity* (what a training app may use on an idle device: the
device profile's usable bytes, or a budget spec's draw) minus what background apps take at the
moment. FedHybrid predicts the next round's budget from the client's recent memory trace and plans
for the prediction; a round whose real budget falls below the plan's peak is a *violation* (the OS
kills the training app).

Contention traces (:func:`contention_trace`)
--------------------------------------------
Time is in *ticks*, :data:`TICKS_PER_ROUND` per round. The background share of the capacity is

    share(t) = clip(base + drift(t) + bursts(t) + jitter(t), 0, max_share)

- ``base``: a per-client constant, uniform in the device kind's range (resident services);
- ``drift``: an Ornstein-Uhlenbeck process (mean reversion ``theta`` per tick, noise ``sigma``):
  caches and services growing and shrinking slowly;
- ``bursts``: a background job starting (Poisson, ``burst_rate`` per tick) takes a lognormal share
  (median ``burst_median``, log-sd ``burst_sigma``) for a geometric number of ticks (mean
  ``burst_ticks``): sync, updates, a user glancing at the phone;
- ``jitter``: small i.i.d. noise per tick (allocator and measurement noise).

The parameters per device kind (:data:`CONTENTION`) are *our assumptions*, not measurements: FL
clients train while idle, charging and on Wi-Fi (Bonawitz et al., "Towards Federated Learning at
Scale", MLSys 2019), so foreground apps are rare and background jobs short; phones are the most
volatile, headless boards the least. docs/FEDHYBRID.md lists them; change them here.

The budget of round r is the **minimum** of the available memory over the round's ticks.

The predictor (:class:`BudgetPredictor`)
---------------------------------------
At the start of round r a client knows its trace up to the last tick. The predictor multiplies
the last observed available memory by a *safety factor*: a low quantile (``quantile``, default
0.5%) of the ratio ``budget(next round) / last observed`` learned on training traces of the same
device kind, conditioned on the client's recent volatility (the standard deviation of its
tick-to-tick relative changes over ``window`` ticks, in three bins). A calm client gets a factor
near 1, a volatile one a larger margin. It is judged on *held-out* traces by the violation rate
(real budget < prediction) and the mean unused headroom ((real - prediction) / real, zero when
violated): :func:`evaluate_predictor`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

#: ticks of the contention trace per training round
TICKS_PER_ROUND = 10
#: ticks of history every client has before round 1
WARMUP_TICKS = 100


@dataclass(frozen=True)
class ContentionModel:
    """Parameters of the background-memory process of one device kind (see the module docs)."""

    base: tuple[float, float]
    theta: float
    sigma: float
    burst_rate: float
    burst_median: float
    burst_sigma: float
    burst_ticks: float
    jitter: float
    max_share: float = 0.8


#: per device kind (memfl.data.devices.DEVICE_KINDS) -- our assumptions, see the module docs
CONTENTION: dict[str, ContentionModel] = {
    "phone": ContentionModel(
        base=(0.05, 0.30),
        theta=0.02,
        sigma=0.003,
        burst_rate=0.003,
        burst_median=0.05,
        burst_sigma=0.5,
        burst_ticks=20,
        jitter=0.002,
    ),
    "board": ContentionModel(
        base=(0.02, 0.10),
        theta=0.02,
        sigma=0.001,
        burst_rate=0.001,
        burst_median=0.03,
        burst_sigma=0.5,
        burst_ticks=10,
        jitter=0.001,
    ),
    "laptop": ContentionModel(
        base=(0.05, 0.25),
        theta=0.02,
        sigma=0.002,
        burst_rate=0.002,
        burst_median=0.05,
        burst_sigma=0.5,
        burst_ticks=30,
        jitter=0.002,
    ),
}


def contention_trace(kind: str, ticks: int, rng: np.random.Generator) -> np.ndarray:
    """Background share of the capacity per tick (float array of length ``ticks``)."""
    try:
        p = CONTENTION[kind]
    except KeyError:
        raise ValueError(f"no contention model for device kind {kind!r}; known: {', '.join(CONTENTION)}") from None
    base = rng.uniform(*p.base)
    drift = np.empty(ticks)
    d = 0.0
    noise = rng.normal(0.0, p.sigma, size=ticks)
    for t in range(ticks):
        d += -p.theta * d + noise[t]
        drift[t] = d
    bursts = np.zeros(ticks)
    starts = np.nonzero(rng.random(ticks) < p.burst_rate)[0]
    for s in starts:
        length = int(rng.geometric(1.0 / p.burst_ticks))
        size = p.burst_median * float(np.exp(rng.normal(0.0, p.burst_sigma)))
        bursts[s : s + length] += size
    share = base + drift + bursts + rng.normal(0.0, p.jitter, size=ticks)
    return np.clip(share, 0.0, p.max_share)


def round_budgets(
    available: np.ndarray, rounds: int, warmup: int = WARMUP_TICKS, ticks_per_round: int = TICKS_PER_ROUND
) -> np.ndarray:
    """The budget of rounds 1..rounds: the minimum of ``available`` over each round's ticks."""
    body = available[warmup : warmup + rounds * ticks_per_round]
    return body.reshape(rounds, ticks_per_round).min(axis=1)


def _volatility(history: np.ndarray, window: int) -> float:
    h = np.asarray(history[-(window + 1) :], dtype=float)
    if len(h) < 3:
        return 0.0
    rel = np.diff(h) / np.maximum(h[:-1], 1e-12)
    return float(np.std(rel))


@dataclass
class BudgetPredictor:
    """Predicts the next round's budget from a client's memory trace (see the module docs).

    quantile: target violation rate; the safety factor is this quantile of the learned ratio
              budget(next round) / last observed available memory.
    window:   ticks of history the volatility is measured over.
    factors:  device kind -> (volatility bin edges, factor per bin), learned by :meth:`fit`.
    """

    quantile: float = 0.005
    window: int = 50
    factors: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    def fit(
        self,
        traces: dict[str, Sequence[np.ndarray]],
        ticks_per_round: int = TICKS_PER_ROUND,
    ) -> "BudgetPredictor":
        """Learn the safety factors from training traces of *available* memory, per device kind."""
        for kind, series in traces.items():
            vols, ratios = [], []
            for avail in series:
                avail = np.asarray(avail, dtype=float)
                for start in range(self.window, len(avail) - ticks_per_round + 1, ticks_per_round):
                    last = avail[start - 1]
                    nxt = avail[start : start + ticks_per_round].min()
                    vols.append(_volatility(avail[:start], self.window))
                    ratios.append(nxt / max(last, 1e-12))
            vols_a, ratios_a = np.asarray(vols), np.asarray(ratios)
            if len(ratios_a) == 0:
                continue
            edges = list(np.quantile(vols_a, [1 / 3, 2 / 3]))
            bins = np.digitize(vols_a, edges)
            fac = []
            for b in range(3):
                sel = ratios_a[bins == b]
                if len(sel) == 0:
                    sel = ratios_a
                fac.append(float(min(1.0, np.quantile(sel, self.quantile))))
            self.factors[kind] = (edges, fac)
        return self

    def factor(self, kind: str, history: np.ndarray) -> float:
        edges, fac = self.factors.get(kind) or next(iter(self.factors.values()))
        return fac[int(np.digitize([_volatility(history, self.window)], edges)[0])]

    def predict(self, kind: str, history: np.ndarray) -> float:
        """Predicted budget of the next round from the available-memory ``history`` (bytes)."""
        history = np.asarray(history, dtype=float)
        return float(history[-1] * self.factor(kind, history))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def training_traces(
    kinds: Sequence[str], *, clients: int = 60, rounds: int = 200, seed: int = 12345
) -> dict[str, list[np.ndarray]]:
    """Available-memory traces (capacity 1.0) to fit a predictor on, per device kind."""
    rng = np.random.default_rng([seed, 7])
    ticks = WARMUP_TICKS + rounds * TICKS_PER_ROUND
    return {k: [1.0 - contention_trace(k, ticks, rng) for _ in range(clients)] for k in kinds}


def evaluate_predictor(
    predictor: BudgetPredictor, traces: dict[str, Sequence[np.ndarray]], ticks_per_round: int = TICKS_PER_ROUND
) -> dict[str, Any]:
    """Violation rate and mean unused headroom of ``predictor`` on (held-out) traces.

    For every trace and every round after the first ``window`` ticks: prediction from the history,
    real budget = minimum over the round's ticks. Returns overall and per-kind figures.
    """
    per_kind = {}
    all_v, all_h = [], []
    for kind, series in traces.items():
        v, h = [], []
        for avail in series:
            avail = np.asarray(avail, dtype=float)
            for start in range(predictor.window, len(avail) - ticks_per_round + 1, ticks_per_round):
                pred = predictor.predict(kind, avail[:start])
                real = avail[start : start + ticks_per_round].min()
                v.append(real < pred)
                h.append(max(0.0, (real - pred) / real))
        per_kind[kind] = {"rounds": len(v), "violation_rate": float(np.mean(v)), "mean_headroom": float(np.mean(h))}
        all_v += v
        all_h += h
    return {
        "rounds": len(all_v),
        "violation_rate": float(np.mean(all_v)),
        "mean_headroom": float(np.mean(all_h)),
        "per_kind": per_kind,
    }


class FederationBudgets:
    """Per client and round: the real budget (from its contention trace) and the predicted one.

    capacities: bytes per client (the budget spec's draw: the most a training app can have).
    kinds:      device kind per client (phone | board | laptop).
    """

    def __init__(
        self,
        capacities: Sequence[int],
        kinds: Sequence[str],
        rounds: int,
        *,
        seed: int,
        predictor: BudgetPredictor | None = None,
    ) -> None:
        self.capacities = [int(c) for c in capacities]
        self.kinds = list(kinds)
        self.rounds = int(rounds)
        rng = np.random.default_rng([int(seed), 4242])
        ticks = WARMUP_TICKS + self.rounds * TICKS_PER_ROUND
        self.available = [
            cap * (1.0 - contention_trace(kind, ticks, rng)) for cap, kind in zip(self.capacities, self.kinds)
        ]
        self.predictor = predictor or BudgetPredictor().fit(training_traces(sorted(set(kinds))))
        self._real = [round_budgets(a, self.rounds) for a in self.available]

    def real(self, client: int, rnd: int) -> int:
        """The real budget of ``client`` in round ``rnd`` (1-based): the minimum over the round."""
        return int(self._real[client][rnd - 1])

    def predicted(self, client: int, rnd: int) -> int:
        """The predicted budget of ``client`` for round ``rnd`` from its trace before the round."""
        start = WARMUP_TICKS + (rnd - 1) * TICKS_PER_ROUND
        return int(self.predictor.predict(self.kinds[client], self.available[client][:start]))


def federation_budgets(config: Any, infos: Sequence[Any]) -> FederationBudgets | None:
    """The simulator's per-round budgets for ``config`` (None when ``[fedhybrid] contention`` is
    off): every client's configured budget is its capacity, its device profile's kind picks the
    contention model, and the predictor is fitted on training traces with the configured
    quantile."""
    fh = getattr(config, "fedhybrid", None)
    if fh is None or not fh.contention:
        return None
    from memfl.data.devices import get_device

    kinds = [get_device(i.device).kind for i in infos]
    predictor = BudgetPredictor(quantile=fh.predictor_quantile).fit(training_traces(sorted(set(kinds))))
    return FederationBudgets(
        [i.budget_bytes for i in infos], kinds, config.run.rounds, seed=config.run.seed, predictor=predictor
    )
