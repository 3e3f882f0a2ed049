"""Bring your own model and data: an MLP on generated tabular data (flat feature vectors).

    python examples/tabular_mlp.py            # < 1 minute on 2 CPU cores

The model builder takes an optional ``width`` so HeteroFL can build width-scaled sub-models
(every parameter of a width-w model is a leading slice of the full model's).
"""

import torch
from torch import nn

import memfl

FEATURES, CLASSES = 32, 4


def make_mlp(width: float = 1.0) -> nn.Module:
    hidden = max(2, int(1024 * width))
    return nn.Sequential(
        nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)
    )


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features; the label is which of 4 fixed random directions the sample leans to."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, FEATURES, generator=g)
    return x, (x @ directions).argmax(dim=1)


if __name__ == "__main__":  # memfl.measure spawns a child that re-imports this file
    x_train, y_train = make_data(2000, seed=1)
    x_test, y_test = make_data(500, seed=2)
    results = memfl.run(
        make_mlp,
        train=(x_train, y_train),
        test=(x_test, y_test),
        method="heterofl",
        clients=20,
        per_round=10,
        rounds=10,
        partition="dirichlet:0.5",
        budgets="relative:0.3-1.1",
        lr=0.05,
        out="results/tabular_mlp",
    )
    for r in results["rounds"]:
        print(f"round {r['round']}: accuracy {r['accuracy']:.3f}, plans {sorted({c['plan'] for c in r['clients']})}")

    est = memfl.estimate(make_mlp(), (32, FEATURES))  # predicted, no training
    meas = memfl.measure(make_mlp, (32, FEATURES))  # measured in a fresh process
    print(f"peak at batch 32: estimated {est.peak_bytes / 2**20:.2f} MiB, measured {meas.peak_bytes / 2**20:.2f} MiB")
    # FedHybrid's planner: per segment keep / recompute / compress activations to fit a budget. This
    # MLP's memory is mostly parameters, gradients and momentum, which no activation plan removes,
    # so 0.8x of the full peak is out of reach and the planner says which budget would do.
    try:
        choice = memfl.plan(make_mlp, (32, FEATURES), "0.8x", timing=False)
        print(
            f"plan for 0.8x the full peak: {choice.plan.label}, predicted {choice.predicted_peak_bytes / 2**20:.2f} MiB"
        )
    except memfl.InfeasibleBudget as err:
        print(f"no FedHybrid plan for 0.8x the full peak: {err}")
