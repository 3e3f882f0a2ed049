"""The one round loop, for every runtime.

In: the config, the server's set-up (:func:`memfl.server.setup.set_up_server`: strategy, initial or
resumed parameters and rounds), the checkpoint it was resumed from, an :class:`~memfl.server.executor.Executor`
(how instructions reach clients), the test set if this process has one, a
:class:`~memfl.server.progress.Reporter` and an optional ``on_round`` callback.
Out: the results dict (:mod:`memfl.server.records`), also written to ``<out>/results.json``, with
the accuracy plot in ``<out>/accuracy.png`` (when a test set exists).

Per round: ``executor.clients`` (who is available, with the budget to plan with) ->
``strategy.configure_train`` (selection and plans) -> ``executor.run`` (one outcome per
instruction) -> validate (one outcome per instruction, for the instruction's client; every ok
result checked against its instruction, :mod:`memfl.server.validate`: a failing one becomes
``rejected``) -> the round deadline (``[run] round_deadline``, :func:`memfl.server.records.resolve_deadline`)
-> ``strategy.aggregate_train`` over the ok results -> evaluate every ``run.eval_every`` rounds and
the last (when a test set exists) -> records (the same fields on every runtime) and the virtual
clock -> checkpoint (the global model, the rounds so far, the strategy's state) -> progress ->
``on_round(entry)``.

Caveats: a round's ``round_seconds`` and ``timing`` are wall time of this process and differ run to
run (they are not part of what a resumed run must reproduce); an exception from ``on_round`` stops
the run after the round's checkpoint was written, so running again resumes after that round.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from memfl.config import Config, parse_deadline
from memfl.core.protocol import Result
from memfl.core.trainer import evaluate
from memfl.data import Dataset
from memfl.server.checkpoint import Checkpoint
from memfl.server.executor import Candidate, Executor
from memfl.server.progress import Reporter
from memfl.server.records import client_entry, client_record, resolve_deadline, round_entry, summarize
from memfl.server.setup import ServerSetup
from memfl.server.validate import Validator


def run_rounds(
    config: Config,
    setup: ServerSetup,
    checkpoint: Checkpoint,
    executor: Executor,
    *,
    test: Dataset | None,
    reporter: Reporter,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    plot_label: str | None = None,
) -> dict[str, Any]:
    """Run the rounds left after ``setup.rounds`` up to ``config.run.rounds``; return the results.

    ``test``: the data set whose test split evaluates the global model (``None``: no evaluation,
    accuracy and loss stay ``None``; the Flower server may lack the data). ``plot_label``: the
    accuracy plot's legend (default: the method).
    """
    out = Path(config.run.out)
    strategy, params, rounds = setup.strategy, setup.params, setup.rounds
    global_model = setup.global_model.to(config.run.device)  # evaluated, loaded with params
    total = config.run.rounds
    virtual_total = rounds[-1]["virtual_seconds"] if rounds else 0.0
    validator = Validator(setup.model_fn, config.aggregation.max_update_norm)
    deadline = parse_deadline(config.run.round_deadline)
    expected = rounds[-1].get("answered_virtual_seconds") if rounds else None  # a "2x" deadline's fallback
    if rounds:
        reporter.note(f"resuming {out} after round {len(rounds)}")
    with reporter:
        reporter.start(total, len(rounds))
        for rnd in range(len(rounds) + 1, total + 1):
            t0 = time.perf_counter()
            candidates = executor.clients(rnd)
            if not candidates:
                reporter.note(f"round {rnd}: no client is available")
            by_id: dict[int, Candidate] = {c.info.id: c for c in candidates}
            t_plan = time.perf_counter()
            instructions = strategy.configure_train(rnd, params, [c.for_planning() for c in candidates])
            t_run = time.perf_counter()
            outcomes = executor.run(rnd, instructions)
            t_validate = time.perf_counter()
            if len(outcomes) != len(instructions):
                raise RuntimeError(
                    f"round {rnd}: the {executor.runtime} executor returned {len(outcomes)} "
                    f"outcomes for {len(instructions)} instructions"
                )
            records: list[dict[str, Any]] = []
            for i, (ins, outcome) in enumerate(zip(instructions, outcomes, strict=True)):
                if outcome.client_id != ins.client_id or ins.client_id not in by_id:
                    raise RuntimeError(
                        f"round {rnd}: an outcome for client {outcome.client_id} answers the "
                        f"instruction for client {ins.client_id}"
                    )
                if outcome.status == "ok":
                    reason = validator.check(ins, by_id[ins.client_id].info, outcome.result)
                    if reason is not None:  # never reaches the strategy
                        outcomes[i] = outcome = replace(outcome, status="rejected", error=reason)
                if outcome.status in ("failed", "rejected"):
                    where = f" ({outcome.where})" if outcome.where else ""
                    fault = f" (injected {outcome.fault})" if outcome.fault else ""
                    reporter.warn(
                        f"round {rnd}: client {ins.client_id}{where} {outcome.status}{fault}: {outcome.error}"
                    )
                records.append(client_record(ins, by_id[ins.client_id], outcome))
            deadline_seconds = resolve_deadline(records, deadline, expected)  # may turn late ok records to timeout
            results: list[Result] = [
                o.result for o, rec in zip(outcomes, records) if o.status == "ok" and rec["status"] == "ok"
            ]
            t_agg = time.perf_counter()
            params = strategy.aggregate_train(rnd, params, results)
            t_eval = time.perf_counter()
            accuracy = loss = None
            if test is not None and (rnd % config.run.eval_every == 0 or rnd == total):
                # an executor with workers may split the evaluation over them (the same numbers)
                split = getattr(executor, "evaluate", None)
                scores = split(params, test.test_x, test.test_y) if split is not None else None
                if scores is None:
                    global_model.load_state_dict(params)
                    scores = evaluate(global_model, test.test_x, test.test_y, device=config.run.device)
                accuracy, loss = scores
            t_end = time.perf_counter()
            entry = round_entry(
                rnd, records, strategy.round_report(rnd), accuracy, loss, virtual_total, deadline_seconds
            )
            entry["eligible_clients"] = strategy.eligible.pop(rnd, None)  # None: a strategy that plans otherwise
            virtual_total = entry["virtual_seconds"]
            if entry["statuses"].get("ok", 0) + entry["statuses"].get("rejected", 0):
                expected = entry["answered_virtual_seconds"]
            entry["round_seconds"] = t_end - t0
            entry["timing"] = {
                "clients_seconds": t_plan - t0,
                "plan_seconds": t_run - t_plan,
                "run_seconds": t_validate - t_run,
                "validate_seconds": t_agg - t_validate,
                "aggregate_seconds": t_eval - t_agg,
                "evaluate_seconds": t_end - t_eval,
                **executor.timing(),
            }
            rounds.append(entry)
            checkpoint.save(params, {"config": config.to_json(), "rounds": rounds, "strategy": strategy.state_dict()})
            reporter.round_done(entry, total)
            if on_round:
                on_round(entry)

        results_dict = {
            "config": config.to_json(),
            "runtime": executor.runtime,
            "memfl": {"torch": torch.__version__, **executor.versions},
            "full_peak_bytes": setup.full_peak,
            "clients": [client_entry(c) for c in executor.roster()],
            "rounds": rounds,
            "summary": summarize(rounds),
        }
        (out / "results.json").write_text(json.dumps(results_dict, indent=1))
        if test is not None:
            from memfl.report import plot_accuracy

            plot_accuracy([results_dict], out / "accuracy.png", labels=[plot_label or config.run.method])
        reporter.finished(str(out / "results.json"))
    return results_dict
