"""Client selection: ``fedhybrid`` (Stat x MemStat x CompStat + UCB), ``oort`` and ``random``.

A :class:`Selector` picks ``k`` of the eligible clients each round from plain facts about them
(:class:`Candidate`) and learns from the results (:meth:`Selector.update`). All three share
Oort's exploration/exploitation scheme, so they differ only in the utility:

- ``random``: uniform.
- ``oort`` (Lai et al., OSDI 2021): statistical utility ``|B_i| * sqrt(mean(loss^2))`` over the
  client's last reported sample losses, plus the staleness bonus ``sqrt(0.1 * log(R) / L_i)``
  (R the current round, L_i the round the client last took part in), times the system penalty
  ``(T / t_i) ** alpha`` for clients slower than the preferred round duration ``T``. ``T`` is the
  ``pacer`` percentile of the candidates' durations; the pacer raises it by ``pacer_step``
  when the utility picked over the last ``pacer_window`` rounds fell below the window before.
- ``fedhybrid`` (SPEC 3.1): ``Stat(i) * MemStat(i) * CompStat(i)`` with the same staleness bonus
  added to Stat (like Oort, whose system penalty also scales the bonus: a slow client is not made
  attractive by having waited), ``Stat(i) = mean(loss^2)`` over the client's last reported losses,
  ``MemStat(i) = min(1, M_i / M_G)`` (predicted budget over the full-training peak: clients that
  must recompute or compress are down-weighted) and ``CompStat(i) = 1 / t_i``, the client's
  predicted round time on its device *under its plan* (compute including the plan's
  recompute/compression overhead, plus transfer). Stat and CompStat are normalised by their
  maximum over the candidates.

Exploration (both utilities): a share ``epsilon`` of the picks goes to clients never selected
(*unexplored*: no result of theirs has reached the selector yet), sampled with probability
proportional to their speed-aware prior (``fedhybrid``: MemStat x CompStat; ``oort``: 1 / t_i);
the rest exploits: clients whose utility is at least ``cutoff`` times the k-th best are sampled
with probability proportional to utility (Oort's cut-off sampling). ``explore_rule`` sets
``epsilon``:

- ``"decay"`` (the default, Oort's own schedule): ``max(explore_min, explore * explore_decay **
  (round - 1))`` -- a function of the round number only, whatever the size of the pool: a pool
  that hybrid plans doubled is still explored at 0.9 x 0.98^r, and a small one long after it is
  covered (the picks then fall back to exploitation, there being nobody left to explore).
- ``"unexplored"`` (issue 11 part 4): ``epsilon = max(explore_min, explore * U / E)`` while
  ``U > 0``, else 0, where ``E`` is the number of eligible candidates this round and ``U`` the
  number of them still unexplored. ``U / E`` is the chance that a uniformly drawn eligible client is
  unexplored, so the share of exploration tracks how much of *this round's* pool is still unknown:
  it starts at ``explore`` (everyone unknown), falls as the pool is covered -- with ``k`` picks of
  ``E`` per round by about a factor ``1 - explore * k / E`` per round, fast on a small pool, slower
  on a doubled one -- and ends when the eligible pool is covered, whatever the round number. The
  floor ``explore_min`` drains the last few unexplored clients within a few rounds instead of
  leaving them to a share that shrinks with them (with the floor at 0 the last ones would be
  reached only when ``explore * k * U / E`` rounds to a pick). Oort's pacer is the anchor of the
  idea -- a schedule driven by what the selector has observed rather than by the clock; it is a
  pure function of ``(U, E)``, so it needs no state beyond the explored set and resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SELECTIONS = ("fedhybrid", "oort", "random")
#: how the exploration share is set (see the module docs)
EXPLORE_RULES = ("decay", "unexplored")


@dataclass
class Candidate:
    """What the server knows about one eligible client this round.

    seconds:   predicted round duration on its device under its plan (compute + transfer).
    mem_stat:  MemStat = min(1, predicted budget / full-training peak).
    """

    id: int
    num_samples: int
    speed: float
    seconds: float
    mem_stat: float = 1.0


@dataclass
class ClientStats:
    """What the selector learnt about a client from its results."""

    loss_sq: float = 0.0  # mean squared sample loss of its last report
    num_samples: int = 0
    last_round: int = 0
    duration: float | None = None  # last observed round duration
    rounds: int = 0


@dataclass
class Selector:
    """Oort-style exploration/exploitation around a utility (see the module docs)."""

    name: str = "fedhybrid"
    explore: float = 0.9
    explore_decay: float = 0.98
    explore_min: float = 0.2
    explore_rule: str = "decay"
    cutoff: float = 0.95
    staleness: float = 0.1
    alpha: float = 2.0
    pacer: float = 30.0
    pacer_step: float = 10.0
    pacer_window: int = 20
    stats: dict[int, ClientStats] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # utility picked per round (pacer)

    def __post_init__(self) -> None:
        if self.name not in SELECTIONS:
            raise ValueError(f"unknown selection {self.name!r}; expected one of {', '.join(SELECTIONS)}")
        if self.explore_rule not in EXPLORE_RULES:
            raise ValueError(f"unknown explore_rule {self.explore_rule!r}; expected one of {', '.join(EXPLORE_RULES)}")

    # -- utilities ------------------------------------------------------------------------------
    def epsilon(self, rnd: int, unexplored: int | None = None, eligible: int | None = None) -> float:
        """The exploration share of round ``rnd`` (module docs). ``unexplored`` / ``eligible``: how
        many of this round's eligible candidates are unexplored / eligible -- needed by the
        ``"unexplored"`` rule (without them it answers ``explore``, the share of an unknown pool)."""
        if self.explore_rule == "unexplored":
            if unexplored is None or not eligible:
                return self.explore
            if unexplored <= 0:
                return 0.0
            return max(self.explore_min, self.explore * min(1.0, unexplored / eligible))
        return max(self.explore_min, self.explore * self.explore_decay ** max(0, rnd - 1))

    def unexplored(self, ids) -> int:
        """How many of ``ids`` the selector has no result of yet."""
        return sum(1 for i in ids if i not in self.stats)

    def _bonus(self, rnd: int, st: ClientStats) -> float:
        return math.sqrt(self.staleness * math.log(max(rnd, 2)) / max(1, st.last_round))

    def preferred_duration(self, candidates: list[Candidate]) -> float:
        return float(np.percentile([c.seconds for c in candidates], min(100.0, self.pacer)))

    def utilities(self, rnd: int, candidates: list[Candidate]) -> dict[int, float]:
        """Utility of every *explored* candidate this round."""
        explored = [c for c in candidates if c.id in self.stats]
        if not explored:
            return {}
        if self.name == "oort":
            T = self.preferred_duration(candidates)
            raw = {c.id: self.stats[c.id].num_samples * math.sqrt(max(self.stats[c.id].loss_sq, 0.0)) for c in explored}
            top = max(raw.values()) or 1.0
            out = {}
            for c in explored:
                st = self.stats[c.id]
                t = st.duration if st.duration is not None else c.seconds
                u = raw[c.id] / top + self._bonus(rnd, st)
                if t > T:
                    u *= (T / t) ** self.alpha
                out[c.id] = u
            return out
        # fedhybrid: (Stat + UCB staleness bonus) x MemStat x CompStat
        top_stat = max(self.stats[c.id].loss_sq for c in explored) or 1.0
        top_comp = max(1.0 / c.seconds for c in candidates)
        return {
            c.id: (self.stats[c.id].loss_sq / top_stat + self._bonus(rnd, self.stats[c.id]))
            * c.mem_stat
            * ((1.0 / c.seconds) / top_comp)
            for c in explored
        }

    def _prior(self, candidates: list[Candidate]) -> np.ndarray:
        """Sampling weights of unexplored clients: faster (and, for fedhybrid, roomier) first."""
        inv = np.array([1.0 / c.seconds for c in candidates])
        if self.name == "fedhybrid":
            inv = inv * np.array([c.mem_stat for c in candidates])
        return inv / inv.sum() if inv.sum() > 0 else np.full(len(candidates), 1 / len(candidates))

    # -- selection ------------------------------------------------------------------------------
    def select(self, rnd: int, candidates: list[Candidate], k: int, rng: np.random.Generator) -> list[int]:
        """Ids of ``k`` (or all, if fewer) of ``candidates`` for round ``rnd``."""
        if len(candidates) <= k:
            return [c.id for c in candidates]
        if self.name == "random":
            idx = rng.choice(len(candidates), size=k, replace=False)
            return [candidates[i].id for i in sorted(idx)]
        util = self.utilities(rnd, candidates)
        explored = [c for c in candidates if c.id in util]
        fresh = [c for c in candidates if c.id not in util]
        n_explore = min(len(fresh), int(round(self.epsilon(rnd, len(fresh), len(candidates)) * k)))
        n_exploit = min(len(explored), k - n_explore)
        n_explore = min(len(fresh), k - n_exploit)
        chosen: list[int] = []
        if n_exploit:
            ranked = sorted(explored, key=lambda c: util[c.id], reverse=True)
            bar = self.cutoff * util[ranked[n_exploit - 1].id]
            pool = [c for c in ranked if util[c.id] >= bar]
            w = np.array([max(util[c.id], 1e-12) for c in pool])
            pick = rng.choice(len(pool), size=n_exploit, replace=False, p=w / w.sum())
            chosen += [pool[i].id for i in pick]
            self.history.append(float(sum(util[pool[i].id] for i in pick)))
            self._pace()
        if n_explore:
            pick = rng.choice(len(fresh), size=n_explore, replace=False, p=self._prior(fresh))
            chosen += [fresh[i].id for i in pick]
        return sorted(chosen)

    def _pace(self) -> None:
        w = self.pacer_window
        if self.name == "oort" and len(self.history) >= 2 * w and len(self.history) % w == 0:
            if sum(self.history[-w:]) < sum(self.history[-2 * w : -w]):
                self.pacer = min(100.0, self.pacer + self.pacer_step)

    # -- feedback -------------------------------------------------------------------------------
    def update(
        self, rnd: int, client_id: int, sample_losses: list[float], num_samples: int, duration: float | None = None
    ) -> None:
        """Record a client's result of round ``rnd``."""
        st = self.stats.setdefault(client_id, ClientStats())
        losses = np.asarray(sample_losses, dtype=float)
        st.loss_sq = float((losses**2).mean()) if len(losses) else st.loss_sq
        st.num_samples = int(num_samples)
        st.last_round = int(rnd)
        st.duration = duration if duration is not None else st.duration
        st.rounds += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "pacer": self.pacer,
            "history": list(self.history),
            "stats": {str(k): asdict(v) for k, v in self.stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pacer = float(state.get("pacer", self.pacer))
        self.history = list(state.get("history", []))
        self.stats = {int(k): ClientStats(**v) for k, v in state.get("stats", {}).items()}
