"""The ServerApp: any memfl strategy driving SuperNodes through Flower's Message API.

Per run:

1. Build the task exactly as the simulator does (:func:`memfl.server.setup.load_data`,
   :func:`~memfl.server.setup.set_up_server`: the same seeds and order), so the initial model, the
   strategy and a resumed checkpoint are the simulator's.
2. Wait for ``min-nodes`` SuperNodes and ask each who it is (a ``query`` message): its partition
   (= memfl client id), sample count, memory budget and device. Flower gives the server only random
   node ids; the budgets reach the planner through these replies (``ClientInfo.budget_bytes``).
3. Drive the shared round loop (:func:`memfl.server.loop.run_rounds`: plan, aggregate, evaluate,
   records, checkpoint, summary -- the simulator's, field for field) through a
   :class:`FlowerExecutor`: the round's clients are the nodes that answered a query, planned with
   the budget each declared; each instruction becomes one ``train`` message to its node (a fresh
   RecordDict each: a plan may differ per node), replies are awaited for ``round-timeout``. A node
   that fails or answers with an error is ``failed`` (``oom`` when the error is a ``MemoryError``:
   its enforced cap, or an injected ``oom``), one that does not answer in time ``timeout``; either is
   left out of the aggregate, and a node that did not answer at all is asked again before it is
   planned for again. With ``[faults]`` the nodes inject the faults the simulator would
   (:mod:`memfl.runtime.faults`, drawn from ``(seed, round, client)``) and the server, drawing the
   same, records each outcome's ``fault``.
   Evaluation needs the test set on the server: without it accuracy stays ``None`` and no plot is
   drawn.
4. ``results.json`` and the accuracy plot land in ``memfl.run.out`` in the format of ``memfl run``
   (:mod:`memfl.server.records`) with ``runtime: "flower"``; Flower-only extras: each client record's
   ``node_id``, ``memory_mb``, ``round_trip_seconds`` and ``node`` timings, each client entry's node
   id, declared memory, budget source and machine, and the round ``timing``'s serialize / push /
   wait / deserialize seconds.

Caveat: the simulator's memory contention (``fedhybrid.contention``) is not simulated here -- a
node's real memory is its own; records have no ``real_budget_bytes``.

No algorithm lives here: selection, planning and merging are the strategy's, training is the
LocalTrainer's (in the ClientApp).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from memfl.core.protocol import Instruction
from memfl.core.strategy import ClientInfo
from memfl.runtime.faults import draw_fault
from memfl.runtime.flower.appconfig import AppSettings
from memfl.runtime.flower.serde import (
    META,
    METRICS,
    content_to_info,
    content_to_result,
    instruction_to_content,
    json_record,
)
from memfl.server.executor import Candidate, Outcome

#: Flower error code of a ClientApp that raised (the node itself is alive)
CLIENT_APP_RAISED = 2
#: the reason of a ClientApp that ran out of memory (a MemoryError, under its cap or injected)
_OOM_REASON = re.compile(r"MemoryError|InjectedOOM|out of memory|can't allocate memory", re.I)


@dataclass
class Node:
    """A SuperNode the server knows: its Flower id, what it declared, and whether it answers."""

    node_id: int
    info: dict[str, Any]
    client: ClientInfo
    lost: bool = False  # did not answer a train message: not planned for until it answers a query


class Mailbox:
    """Messages in flight on a Flower ``Grid``: push now, collect replies whenever they arrive.

    Replies are polled every ``poll_interval`` seconds (``Grid.send_and_receive`` sleeps 3 s
    between polls); each message is tagged with ``(kind, key)`` so that a late reply (a node that
    answers a query sent rounds ago) still finds its way.
    """

    def __init__(self, grid: Grid, poll_interval: float) -> None:
        self.grid = grid
        self.poll_interval = poll_interval
        self.pending: dict[str, tuple[str, Any, float]] = {}  # message id -> (kind, key, sent at)

    def send(self, messages: list[tuple[Message, str, Any]]) -> float:
        """Push ``(message, kind, key)`` triples; return the seconds the push took."""
        if not messages:
            return 0.0
        t0 = time.perf_counter()
        ids = list(self.grid.push_messages([m for m, _, _ in messages]))
        for mid, (_, kind, key) in zip(ids, messages):
            if mid:
                self.pending[mid] = (kind, key, t0)
        return time.perf_counter() - t0

    def in_flight(self, kind: str) -> list[Any]:
        return [key for k, key, _ in self.pending.values() if k == kind]

    def collect(
        self, handle: Callable[[str, Any, Message, float], None], done: Callable[[], bool], timeout: float
    ) -> None:
        """Pull replies, passing each to ``handle(kind, key, reply, seconds since sent)``, until
        ``done()`` or ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        while self.pending:
            for reply in self.grid.pull_messages(list(self.pending)):
                entry = self.pending.pop(reply.metadata.reply_to_message_id, None)
                if entry is not None:
                    kind, key, sent = entry
                    handle(kind, key, reply, time.perf_counter() - sent)
            if done() or time.perf_counter() >= deadline:
                return
            time.sleep(self.poll_interval)

    def forget(self, kind: str) -> None:
        self.pending = {mid: e for mid, e in self.pending.items() if e[0] != kind}


class FlowerServer:
    """Drives one memfl experiment over a Flower ``Grid``; :meth:`run` returns the results dict."""

    def __init__(self, grid: Grid, settings: AppSettings, *, log: Callable[[str], None] | None = None) -> None:
        self.grid = grid
        self.settings = settings
        self.config = settings.config
        self.log = log or (lambda line: print(line, flush=True))
        self.mail = Mailbox(grid, settings.poll_interval)
        self.nodes: dict[int, Node] = {}  # Flower node id -> Node
        self.refused: dict[int, str] = {}  # Flower node id -> why it cannot take part

    # -- who is there ---------------------------------------------------------------------
    def ask_new_nodes(self) -> None:
        """Send a node-info query to every online node that is new or lost (one at a time)."""
        online = set(self.grid.get_node_ids())
        for node_id in [n for n in self.nodes if n not in online]:
            del self.nodes[node_id]  # it left the federation
        asking = set(self.mail.in_flight("query"))
        ask = sorted(n for n in online - asking - set(self.refused) if n not in self.nodes or self.nodes[n].lost)
        ttl = max(self.settings.round_timeout, self.settings.query_timeout, 10.0)
        self.mail.send(
            [
                (
                    Message(
                        RecordDict({META: json_record({"ask": "node-info"})}),
                        dst_node_id=n,
                        message_type=MessageType.QUERY,
                        ttl=ttl,
                    ),
                    "query",
                    n,
                )
                for n in ask
            ]
        )

    def on_query_reply(self, node_id: int, reply: Message) -> None:
        if reply.has_error():
            if reply.error.code == CLIENT_APP_RAISED:  # e.g. a bad --node-config: do not ask again
                self.refused[node_id] = reply.error.reason
                self.log(f"node {node_id} cannot take part: {reply.error.reason}")
            return
        info = content_to_info(reply.content)
        cid = int(info["partition_id"])
        holder = next((n for n in self.nodes.values() if n.client.id == cid and n.node_id != node_id), None)
        if holder is not None and not holder.lost:
            self.refused[node_id] = f"partition-id {cid} is already node {holder.node_id}'s"
            self.log(f"node {node_id} ignored: {self.refused[node_id]}")
            return
        if holder is not None:  # a restarted node took over its partition
            del self.nodes[holder.node_id]
        client = ClientInfo(
            id=cid,
            num_samples=int(info["num_samples"]),
            device=str(info["device"]),
            speed=float(info["speed"]),
            budget_bytes=int(info["budget_bytes"]),
        )
        self.nodes[node_id] = Node(node_id=node_id, info=info, client=client)

    def _handle_query(self, kind: str, key: Any, reply: Message, _seconds: float) -> None:
        if kind == "query":
            self.on_query_reply(key, reply)

    def wait_for_nodes(self) -> None:
        """Until ``min-nodes`` nodes have described themselves, or ``wait-nodes`` seconds pass."""
        deadline = time.perf_counter() + self.settings.wait_nodes
        want = self.settings.min_nodes
        while len(self.nodes) < want and time.perf_counter() < deadline:
            self.ask_new_nodes()
            if not self.mail.pending:  # nobody to wait for: let more nodes come online
                time.sleep(1.0)
            self.mail.collect(
                self._handle_query,
                lambda: len(self.nodes) >= want,
                timeout=min(1.0, max(0.0, deadline - time.perf_counter())),
            )
        if not self.nodes:
            raise RuntimeError(
                f"no SuperNode described itself within {self.settings.wait_nodes:.0f} s "
                f"(refused: {self.refused or 'none'})"
            )
        if len(self.nodes) < want:
            self.log(f"only {len(self.nodes)} of {want} nodes after {self.settings.wait_nodes:.0f} s; going on")

    # -- the experiment -------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up as the simulator does, wait for the nodes, then the shared round loop."""
        from memfl.data import DataError
        from memfl.server.checkpoint import Checkpoint
        from memfl.server.loop import run_rounds
        from memfl.server.progress import LogReporter
        from memfl.server.setup import load_data, set_up_server

        config = self.config
        out = Path(config.run.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.run.seed)
        try:
            data = load_data(config)
        except DataError as err:  # the server may lack the data set: then no evaluation
            data = None
            self.log(f"no test set on the server ({err}); accuracy will not be evaluated")

        self.wait_for_nodes()
        if data is not None:
            input_shape, num_classes = tuple(data.input_shape), data.num_classes
        else:
            first = next(iter(self.nodes.values())).info
            input_shape, num_classes = tuple(first["input_shape"]), int(first["num_classes"])
        # the simulator's set-up, step for step (same seeds, same order): same initial model
        checkpoint = Checkpoint(out)
        setup = set_up_server(
            config, input_shape, num_classes, checkpoint, example=data.example if data is not None else None
        )
        self.log(
            f"memfl on Flower: {config.run.method}, model {config.run.model}, {len(self.nodes)} nodes, "
            f"{config.run.rounds} rounds; full-training peak {setup.full_peak / 2**20:.1f} MB"
        )
        return run_rounds(
            config,
            setup,
            checkpoint,
            FlowerExecutor(self),
            test=data,
            reporter=LogReporter(self.log),
            plot_label=f"{config.run.method} (Flower)",
        )


class FlowerExecutor:
    """The round loop's executor over a :class:`FlowerServer`'s nodes.

    :meth:`clients`: ask new or lost nodes who they are (answers arrive during the round; such
    nodes join the next one), then every node that answers, planned with the budget it declared.
    :meth:`run`: one ``train`` message per instruction (each its own RecordDict), replies within
    ``round-timeout``; a node that does not answer is marked lost, one whose ClientApp raised is
    not. No simulated contention here: a node's real budget is its own business (a ClientApp with
    ``enforce-budget`` refuses a plan too big: a failed outcome).
    """

    runtime = "flower"

    def __init__(self, server: FlowerServer) -> None:
        self.server = server
        self.versions = {"flwr": _flwr_version()}
        self.active: dict[int, Node] = {}  # client id -> node, this round
        self.seen: dict[int, Candidate] = {}  # client id -> its latest entry (the results' clients)
        self._timing: dict[str, float] = {}

    def clients(self, round: int) -> list[Candidate]:
        self.server.ask_new_nodes()
        nodes = sorted((n for n in self.server.nodes.values() if not n.lost), key=lambda n: n.client.id)
        self.active = {n.client.id: n for n in nodes}
        out = []
        for n in nodes:
            cand = Candidate(
                n.client,
                extra={
                    "node_id": n.node_id,
                    "memory_mb": n.info.get("memory_mb"),
                    "budget_source": n.info.get("budget_source"),
                    "machine": n.info.get("machine"),
                },
            )
            self.seen[n.client.id] = cand
            out.append(cand)
        return out

    def roster(self) -> list[Candidate]:
        return [self.seen[cid] for cid in sorted(self.seen)]

    def timing(self) -> dict[str, float]:
        return dict(self._timing)

    def run(self, round: int, instructions: list[Instruction]) -> list[Outcome]:
        server, settings = self.server, self.server.settings
        t_ser0 = time.perf_counter()
        msgs = [
            Message(
                instruction_to_content(ins),
                dst_node_id=self.active[ins.client_id].node_id,
                message_type=MessageType.TRAIN,
                group_id=str(round),
                ttl=max(settings.round_timeout, 10.0),
            )
            for ins in instructions
        ]
        t_ser1 = time.perf_counter()
        push_seconds = server.mail.send([(m, "train", i) for i, m in enumerate(msgs)])
        replies: dict[int, tuple[Message, float]] = {}

        def handle(kind: str, key: Any, reply: Message, seconds: float) -> None:
            if kind == "train" and reply.metadata.group_id == str(round):
                replies[key] = (reply, seconds)
            elif kind == "query":
                server.on_query_reply(key, reply)

        server.mail.collect(handle, lambda: len(replies) == len(msgs), settings.round_timeout)
        server.mail.forget("train")  # replies after the deadline are not waited for
        t_deser0 = time.perf_counter()
        outcomes = []
        for i, ins in enumerate(instructions):
            node = self.active[ins.client_id]
            extra: dict[str, Any] = {"node_id": node.node_id, "memory_mb": node.info.get("memory_mb")}
            where = f"node {node.node_id}"
            reply, seconds = replies.get(i, (None, None))
            if reply is None:
                node.lost = True
                outcomes.append(
                    Outcome(
                        ins.client_id,
                        "timeout",
                        where=where,
                        extra=extra,
                        error=f"no reply within {settings.round_timeout:.0f} s",
                    )
                )
            elif reply.has_error():
                if reply.error.code != CLIENT_APP_RAISED:
                    node.lost = True
                outcomes.append(
                    Outcome(
                        ins.client_id,
                        "oom" if _OOM_REASON.search(reply.error.reason or "") else "failed",
                        where=where,
                        extra=extra,
                        error=f"Flower error {reply.error.code}: {reply.error.reason}",
                    )
                )
            else:
                try:  # a malformed reply (another machine's) must not stop the round
                    res, node_extra = content_to_result(reply.content)
                    metrics = reply.content[METRICS]
                except Exception as err:
                    outcomes.append(
                        Outcome(
                            ins.client_id, "failed", where=where, extra=extra, error=f"malformed reply: {err!r}"[:500]
                        )
                    )
                    continue
                extra.update(
                    round_trip_seconds=seconds,
                    node={
                        **node_extra,
                        "serialize_seconds": metrics.get("serialize-seconds"),
                        "handler_seconds": metrics.get("handler-seconds"),
                    },
                )
                outcomes.append(Outcome(ins.client_id, "ok", result=res, where=where, extra=extra))
        faults = server.config.faults
        if faults.active:  # the nodes inject what the simulator would: record it (memfl.runtime.faults)
            for o in outcomes:
                o.fault = draw_fault(faults, server.config.run.seed, round, o.client_id)
        self._timing = {
            "serialize_seconds": t_ser1 - t_ser0,
            "push_seconds": push_seconds,
            "wait_seconds": t_deser0 - t_ser1 - push_seconds,
            "deserialize_seconds": time.perf_counter() - t_deser0,
        }
        return outcomes


def _flwr_version() -> str:
    import flwr

    return flwr.__version__


app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    FlowerServer(grid, AppSettings.from_run_config(context.run_config)).run()
