"""Split a data set's samples among federated clients.

Specs (strings, as they appear in configs and on the command line):

- ``iid``            shuffle, then cut into ``num_clients`` near-equal parts.
- ``dirichlet:ALPHA`` label skew (Hsu et al. 2019; the NIID-Bench procedure): for every class, client
                     shares are drawn from Dirichlet(ALPHA); a client already holding its fair
                     share (N / num_clients) gets no more of the later classes, which keeps sizes from
                     exploding. Redrawn until every client has >= ``min_size`` samples; small ALPHA
                     (e.g. 0.1) = strong skew, large ALPHA (100) ~ IID.
- ``dirichlet-fixed:ALPHA`` label skew with *fixed client sizes*: every client holds exactly
                     ``N // num_clients`` samples (the first ``N mod num_clients`` clients, in the
                     seeded order, one more) whose label proportions are drawn from Dirichlet(ALPHA)
                     (SPEC 8: ``dirichlet:0.1`` cannot give 200 clients of a 20,000-image pool >= 10
                     samples each). Clients are filled one by one in a seeded random order; when a
                     class a client's draw asks for has run out, the shortfall goes to the classes
                     the draw favours most among those left, so the last clients of the order are
                     less skewed than Dir(ALPHA) (all samples are used).
- ``classes:K``      pathological non-IID (McMahan et al. 2017 style): every client holds exactly K
                     distinct classes; each class is held by about ``num_clients * K / C`` clients,
                     who split its samples evenly.

Every sample goes to exactly one client, and the result depends only on the labels, the spec and
the seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["PARTITION_FORMS", "label_histogram", "parse_partition", "partition"]

#: The accepted spec forms, for error messages and help texts.
PARTITION_FORMS = (
    "'iid', 'dirichlet:ALPHA' (ALPHA > 0, e.g. dirichlet:0.5), 'dirichlet-fixed:ALPHA' (equal client sizes, "
    "e.g. dirichlet-fixed:0.1) or 'classes:K' (integer K >= 1, e.g. classes:2)"
)

#: How many Dirichlet draws are tried before giving up on ``min_size``.
MAX_DIRICHLET_ATTEMPTS = 1000

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?"


def parse_partition(spec: str) -> tuple[str, float | int | None]:
    """Validate a partition spec.

    Returns:
        ``("iid", None)``, ``("dirichlet", alpha)`` or ``("dirichlet-fixed", alpha)`` with alpha a
        positive float, or
        ``("classes", k)`` with k a positive int.

    Raises:
        ValueError: naming the accepted forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"partition spec must be a string, got {type(spec).__name__}; expected {PARTITION_FORMS}")
    s = spec.strip().lower()
    if s == "iid":
        return "iid", None
    m = re.fullmatch(rf"(dirichlet|dirichlet-fixed):\s*({_NUM})", s)
    if m:
        alpha = float(m.group(2))
        if alpha > 0 and math.isfinite(alpha):
            return m.group(1), alpha
        raise ValueError(f"bad partition spec {spec!r}: ALPHA must be > 0; expected {PARTITION_FORMS}")
    m = re.fullmatch(r"classes:\s*([0-9]+)", s)
    if m:
        k = int(m.group(1))
        if k >= 1:
            return "classes", k
        raise ValueError(f"bad partition spec {spec!r}: K must be >= 1; expected {PARTITION_FORMS}")
    raise ValueError(f"bad partition spec {spec!r}; expected {PARTITION_FORMS}")


def _as_labels(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def partition(labels, num_clients: int, spec: str, *, seed: int = 0, min_size: int = 10) -> list[np.ndarray]:
    """Assign sample indices to clients.

    Args:
        labels:      1-D integer class labels (numpy array, list or torch tensor), one per sample.
        num_clients: number of clients (>= 1).
        spec:        ``"iid"``, ``"dirichlet:ALPHA"``, ``"dirichlet-fixed:ALPHA"`` or ``"classes:K"``
                     (see module docstring).
        seed:        the seed; same inputs and seed -> same partition.
        min_size:    for ``dirichlet``, the fewest samples any client may get (draws are repeated up
                     to :data:`MAX_DIRICHLET_ATTEMPTS` times). ``iid`` and ``classes`` give every
                     client at least one sample; it is an error if they cannot.

    Returns:
        ``num_clients`` sorted int64 index arrays, pairwise disjoint, together covering
        ``range(len(labels))``.

    Raises:
        ValueError: a bad spec (naming the accepted forms), too few samples for the clients, or a
            Dirichlet split that keeps leaving a client below ``min_size``.
    """
    kind, arg = parse_partition(spec)
    y = _as_labels(labels)
    n = int(y.shape[0])
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    num_clients = int(num_clients)
    if n < num_clients:
        raise ValueError(f"cannot split {n} samples among {num_clients} clients (each needs at least one)")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "dirichlet":
        parts = _dirichlet(y, num_clients, float(arg), rng, min_size)  # type: ignore[arg-type]
    elif kind == "dirichlet-fixed":
        parts = _dirichlet_fixed(y, num_clients, float(arg), rng)  # type: ignore[arg-type]
    else:
        parts = _classes(y, num_clients, int(arg), rng)  # type: ignore[arg-type]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(
    y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    n = y.shape[0]
    if min_size * num_clients > n:
        raise ValueError(
            f"dirichlet partition: {n} samples cannot give {num_clients} clients {min_size} each; "
            "lower min_size or num_clients"
        )
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    fair = n / num_clients
    best = 0
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        # Draw only the cut points first (cheap), materialise the split once a draw is accepted.
        sizes = np.zeros(num_clients, dtype=np.int64)
        all_cuts = []
        for idx in by_class:
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < fair)  # clients at their fair share get no more
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            sizes += np.diff(cuts, prepend=0, append=len(idx))
            all_cuts.append(cuts)
        smallest = int(sizes.min())
        best = max(best, smallest)
        if smallest >= min_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx, cuts in zip(by_class, all_cuts):
                for client, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                    parts[client].append(chunk)
            return [np.concatenate(p) for p in parts]
    raise ValueError(
        f"dirichlet:{alpha:g} partition: in {MAX_DIRICHLET_ATTEMPTS} draws some client always had fewer "
        f"than min_size={min_size} samples (best draw: {best}); use a larger ALPHA, fewer "
        "clients or a smaller min_size"
    )


def _dirichlet_fixed(y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal client sizes, label proportions from Dirichlet(alpha) (see the module docstring)."""
    n = y.shape[0]
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros(len(classes), dtype=np.int64)
    order = rng.permutation(num_clients)
    base, extra = divmod(n, num_clients)
    parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_clients
    for slot, client in enumerate(order):
        size = base + (1 if slot < extra else 0)
        p = rng.dirichlet(np.full(len(classes), alpha))
        want = np.floor(p * size).astype(np.int64)
        short = size - int(want.sum())  # largest remainders get the rounding
        if short:
            want[np.argsort(-(p * size - want), kind="stable")[:short]] += 1
        take = np.minimum(want, left)
        deficit = size - int(take.sum())
        while deficit > 0:  # a wanted class ran out: the draw's favourite among the classes left
            room = left - take
            k = int(np.argmax(np.where(room > 0, p + 1e-12, -1.0)))
            add = min(int(room[k]), deficit)
            take[k] += add
            deficit -= add
        chunks = [pools[c][used[c] : used[c] + take[c]] for c in range(len(classes))]
        used += take
        left -= take
        parts[int(client)] = np.concatenate(chunks)
    return parts


def _classes(y: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(y)
    c = len(classes)
    if k > c:
        raise ValueError(f"classes:{k} partition: the labels have only {c} classes")
    if num_clients * k < c:
        raise ValueError(
            f"classes:{k} partition: {num_clients} clients x {k} classes cannot cover all {c} classes "
            "(every sample must go to some client); use more clients or a larger K"
        )
    # Client i takes classes order[(i*K + j) mod C], j < K: K distinct classes each (K <= C), every
    # class covered (num_clients*K >= C) and held by floor or ceil(num_clients*K/C) clients.
    order = rng.permutation(classes)
    client_order = rng.permutation(num_clients)
    holders: dict[int, list[int]] = {int(cl): [] for cl in classes}
    for slot, client in enumerate(client_order):
        for j in range(k):
            holders[int(order[(slot * k + j) % c])].append(int(client))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cl, owners in holders.items():
        idx = rng.permutation(np.flatnonzero(y == cl))
        for client, chunk in zip(rng.permutation(owners), np.array_split(idx, len(owners))):
            parts[int(client)].append(chunk)
    out = [np.concatenate(p) for p in parts]
    empty = [i for i, p in enumerate(out) if len(p) == 0]
    if empty:
        raise ValueError(f"classes:{k} partition: clients {empty[:5]} got no samples; use fewer clients")
    return out


def label_histogram(labels, parts: Sequence[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """``(num_clients, num_classes)`` count matrix of each client's labels (for reports and tests)."""
    y = _as_labels(labels)
    nc = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    return np.stack([np.bincount(y[p], minlength=nc) for p in parts]) if parts else np.zeros((0, nc), np.int64)
