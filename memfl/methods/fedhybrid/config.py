"""``[fedhybrid]``: the one source of FedHybrid's (and its baselines') defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from memfl.core.config import Section


class FedHybridConfig(Section):
    """``method = "fedhybrid"`` (and the baselines ``oort``, ``random``, ``oort+fedprox``): SPEC 3,
    docs/FEDHYBRID.md."""

    selection: Literal["fedhybrid", "oort", "random"] = "fedhybrid"  # fedhybrid's selector
    contention: bool = False  # per-round budgets from contention traces + the budget predictor
    predictor_quantile: float = Field(0.005, gt=0, lt=0.5)  # target violation rate of the predictor
    margin: float = Field(0.03, ge=0, lt=0.5)  # plans peak at most budget x (1 - margin)
    # MiB kept free on top of the margin (the estimator's absolute error, 1-3 MiB, exceeds 3% of a
    # small model's budget; memfl plan --slack): plans peak at most budget x (1 - margin) - slack
    slack_mb: float = Field(0.0, ge=0)
    bits: list[int] = Field(default_factory=lambda: [8, 4, 2], min_length=1)  # compression widths
    min_bits: int = Field(2, ge=1, le=8)  # accuracy guard: no segment compressed below this
    mixed: bool = True  # channel-wise mixed bits (False: uniform)
    recompute: bool = True  # allow recomputation
    plan_levels: int = Field(16, ge=2)  # budgets the server pre-solves plans for
    prox_mu: float = Field(0.01, ge=0)  # oort+fedprox's proximal term (when train.prox_mu is 0)
    explore: float = Field(0.9, ge=0, le=1)  # initial exploration share of the picks
    explore_decay: float = Field(0.98, gt=0, le=1)
    explore_min: float = Field(0.2, ge=0, le=1)
    # "decay": explore x explore_decay^(round-1), floor explore_min (Oort's schedule); "unexplored":
    # max(explore_min, explore x unexplored eligible / eligible), 0 once every eligible client has
    # reported (issue 11 part 4; memfl/methods/fedhybrid/selection.py)
    explore_rule: Literal["decay", "unexplored"] = "decay"
    # fedhybrid only (issue 11 part 3, a measurement tool): "planned" trains each client with its
    # plan; "keep" keeps everything the plan decided -- eligibility, selection (which sees the
    # planned round time), the simulator's memory check (against the planned peak) -- and trains
    # the chosen clients with full training instead (no recompute, no compression), as if they
    # had the memory: the accuracy difference to "planned" is the plans' compression error
    plans: Literal["planned", "keep"] = "planned"
    # random / oort / oort+fedprox: "aware" sends only clients whose predicted budget fits full
    # training; "unaware" (the paper's memory-unaware baselines) sends any client, and the simulator
    # kills (status "oom") one whose real budget is below the full-training peak -- needs contention
    baseline_memory: Literal["aware", "unaware"] = "aware"

    @model_validator(mode="after")
    def _unaware_needs_contention(self) -> "FedHybridConfig":
        if self.baseline_memory == "unaware" and not self.contention:
            raise ValueError(
                'baseline_memory = "unaware" needs contention = true: only with contention '
                "traces does the simulator kill a client whose real budget is below its peak"
            )
        return self
