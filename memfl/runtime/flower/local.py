"""A real Flower federation on 127.0.0.1: one SuperLink, N SuperNodes, one ``flwr run``.

:class:`LocalFederation` starts the processes Flower's deployment runtime uses on real machines —
``flower-superlink`` and ``flower-supernode`` (each with its SuperExec, which starts the
``flwr-serverapp`` / ``flwr-clientapp`` processes: by default memfl's warm SuperExec beside
``--isolation process``, :mod:`memfl.runtime.flower.superexec`; Flower's own with ``warm=False``) —
on free loopback ports, offline, and either insecure (the default) or, with ``secure=True``, with
TLS and SuperNode authentication (:mod:`memfl.runtime.flower.secure`: a throw-away CA, a server
certificate for 127.0.0.1, one registered key pair per node, all in a ``0700`` folder):

- a fresh ``FLWR_HOME`` holding a ``config.toml`` with one connection (``local``), so the ``flwr``
  CLI never writes its default config nor starts a background SuperLink of its own;
- ``--disable-runtime-dependency-installation`` on the SuperLink, ``FLWR_TELEMETRY_ENABLED=0`` and
  ``FLWR_DISABLE_UPDATE_CHECK=1`` everywhere: nothing is fetched;
- every process in its own session, stopped by its process group (SIGTERM, then SIGKILL), on
  every exit path;
- readiness: ``/health`` on the SuperLink and on every SuperNode, then ``flwr supernode ls``
  until all N nodes are online; every wait is bounded.

:func:`run_local` is ``memfl flower local``: it gives node ``i`` the data partition, device and
memory budget the simulator gives client ``i`` (``memory-mb``/``device`` in its ``--node-config``),
writes the Flower app for the config, runs it, checks the run's status (``flwr run`` itself does not
fail when the run does) and returns the ``results.json`` the ServerApp wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from memfl.config import Config, build_config
from memfl.runtime.flower.appconfig import AppSettings, write_app
from memfl.runtime.flower.secure import NodeKey, SecureMaterial, generate

CONNECTION = "local"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FlowerError(RuntimeError):
    """The local federation could not start, or the run failed or timed out (logs are named)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config_text(values: Mapping[str, Any]) -> str:
    """``{"partition-id": 0, "device": "rpi4-4gb"}`` -> ``partition-id=0 device="rpi4-4gb"``."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _bin(name: str) -> str:
    """The Flower executable next to this Python (a venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int | None = None
    #: processes that belong to this one (its warm SuperExec): signalled and stopped with it
    companions: list["Proc"] = field(default_factory=list)
    _groups: list[int] = field(default_factory=list, repr=False)  # process groups signalled so far

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this process's group and to its companions' groups."""
        for pid in [self.popen.pid, *(c.popen.pid for c in self.companions)]:
            _signal_group(pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group (and the groups of its descendants: the SuperLink starts its
        ``flower-superexec`` in a session of its own), SIGKILL them after ``grace`` seconds; then
        the companions the same way."""
        self._stop(grace)
        for c in self.companions:
            c.stop(grace)

    def terminate(self) -> None:
        """SIGTERM the process group and its descendants' groups (remembered for :meth:`stop`),
        and the companions', without waiting."""
        self._groups = sorted({*self._groups, self.popen.pid, *_descendant_groups(self.popen.pid)})
        if self.popen.poll() is None:
            for g in self._groups:
                _signal_group(g, signal.SIGTERM)
        for c in self.companions:
            c.terminate()

    def _stop(self, grace: float) -> None:
        groups = sorted({*self._groups, self.popen.pid, *_descendant_groups(self.popen.pid)})
        if self.popen.poll() is None:
            for g in groups:
                _signal_group(g, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for g in groups:  # stray members of the groups too
            _signal_group(g, signal.SIGKILL)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _descendant_groups(pid: int) -> list[int]:
    """Process groups of ``pid``'s descendants other than its own (Linux /proc; else none)."""
    parent: dict[int, int] = {}
    group: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(name)], group[int(name)] = int(fields[1]), int(fields[2])
    found, frontier = set(), [pid]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found.add(child)
                frontier.append(child)
    return sorted({group[c] for c in found} - {pid})


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 (a context manager: always stopped on exit).

    node_configs: one ``--node-config`` mapping per SuperNode.
    workdir:      where FLWR_HOME, the logs and the app go (default: a fresh temporary folder).
    threads:      OMP/torch threads per node process (default: the cores shared among the nodes).
    warm:         start the SuperLink and SuperNodes with ``--isolation process`` beside memfl's
                  warm SuperExec (:mod:`memfl.runtime.flower.superexec`: each ServerApp/ClientApp
                  is forked from a process that has imported torch already); ``False``: Flower's
                  own SuperExec, a fresh ``flwr-clientapp`` process per message.
    secure:       TLS on the SuperLink (its Fleet, Control and Runtime APIs: one port) and
                  ``--enable-supernode-auth``; every node gets a key pair, registered with
                  ``flwr supernode register`` before it starts. The keys and certificates live in
                  ``WORKDIR/secrets`` (``0700``, files ``0600``), never in a run's ``out``.
    """

    node_configs: list[dict[str, Any]]
    workdir: Path | None = None
    threads: int | None = None
    warm: bool = True
    secure: bool = False
    log: Callable[[str], None] = lambda line: None
    superlink: Proc | None = field(default=None, init=False)
    supernodes: list[Proc] = field(default_factory=list, init=False)
    #: secure: the CA, server certificate and node keys; node_ids: what registration returned
    material: SecureMaterial | None = field(default=None, init=False)
    node_ids: list[int] = field(default_factory=list, init=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="memfl-flower-")
            self.workdir = Path(self._tmp.name)
        self.workdir = Path(self.workdir).absolute()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.secrets = self.workdir / "secrets"
        self.port: int | None = None
        self.threads_per_node: int | None = self.threads

    # -- environment ----------------------------------------------------------------------
    def env(self, threads: int | None = None) -> dict[str, str]:
        from memfl.core.version import SOURCE_ROOT

        env = dict(os.environ)
        root = str(SOURCE_ROOT)
        env.update(
            FLWR_HOME=str(self.home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONPATH=os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])]),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            PYTHONUNBUFFERED="1",
        )
        for key in ("NO_PROXY", "no_proxy"):  # loopback never goes through a proxy
            env[key] = ",".join(filter(None, [env.get(key), "127.0.0.1", "localhost"]))
        # the SuperExecs look for new ClientApp/ServerApp tasks every second by default
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
        if threads is not None and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        return env

    def _spawn(self, name: str, cmd: list[str], threads: int | None = None, port: int | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        fh = open(log, "wb")
        try:
            popen = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(threads),
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            fh.close()
        return Proc(name, popen, log, port)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run one ``flwr`` CLI command against this federation."""
        return subprocess.run(
            [_bin("flwr"), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.workdir,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "LocalFederation":
        """Start the SuperLink and the SuperNodes; return when all nodes are online."""
        deadline = time.monotonic() + timeout
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        port = self.port = free_port()
        n = len(self.node_configs)
        if self.secure:
            self.material = generate(self.secrets, n)
            (self.secrets / "superexec.secret").unlink(missing_ok=True)
            fd = os.open(self.secrets / "superexec.secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            link = f'root-certificates = "{self.material.ca_cert}"\n'
        else:
            link = "insecure = true\n"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{link}'
        )
        self.threads_per_node = self.threads or max(1, (os.cpu_count() or 1) // max(1, n))
        try:
            self.superlink = self._spawn(
                "superlink",
                [
                    _bin("flower-superlink"),
                    *self._superlink_security(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                    *self._isolation(),
                ],
                port=port,
            )
            self._wait_health(self.superlink, deadline, tls=self.secure)
            if self.warm:
                self._spawn_superexec(self.superlink, "superexec-superlink", port, tls=self.secure)
            if self.material is not None:
                self.node_ids = [self.register(key) for key in self.material.nodes]
            for i, nc in enumerate(self.node_configs):
                key = self.material.nodes[i] if self.material is not None else None
                self.supernodes.append(self.spawn_supernode(f"supernode-{i}", nc, key=key))
            for i, proc in enumerate(self.supernodes):
                self._wait_health(proc, deadline)
                if self.warm:
                    self._spawn_superexec(proc, f"superexec-{i}", proc.port, threads=self.threads_per_node)
            self._wait_nodes_online(n, deadline)
        except BaseException:
            self.stop()
            raise
        how = "TLS + SuperNode authentication" if self.secure else "insecure"
        self.log(f"Flower SuperLink on 127.0.0.1:{port} ({how}) with {n} SuperNodes (logs in {self.logs})")
        return self

    def _isolation(self) -> list[str]:
        return ["--isolation", "process"] if self.warm else []

    def _superexec_auth(self) -> list[str]:
        """The SuperExec shared secret (secure + process isolation: only holders reach the Runtime APIs)."""
        if self.secure and self.warm:
            return ["--superexec-auth-secret-file", str(self.secrets / "superexec.secret")]
        return []

    def _superlink_security(self) -> list[str]:
        if self.material is None:
            return ["--insecure"]
        m = self.material
        return [
            "--ssl-ca-certfile",
            str(m.ca_cert),
            "--ssl-certfile",
            str(m.server_cert),
            "--ssl-keyfile",
            str(m.server_key),
            "--enable-supernode-auth",
            *self._superexec_auth(),
        ]

    def register(self, key: NodeKey) -> int:
        """``flwr supernode register KEY.pub``: admit the node holding ``key``; return its node id."""
        res = self.flwr("supernode", "register", str(key.public), CONNECTION, "--format", "json", timeout=60)
        try:
            return int(json.loads(res.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise FlowerError(
                f"flwr supernode register {key.public} failed (status {res.returncode}):\n"
                f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
            ) from None

    def spawn_supernode(
        self,
        name: str,
        node_config: Mapping[str, Any],
        *,
        key: NodeKey | None = None,
        tls: bool | None = None,
        trust_ca: bool = True,
        extra: list[str] | None = None,
    ) -> Proc:
        """Start one ``flower-supernode`` against this SuperLink (not waited for; not in
        :attr:`supernodes`). ``tls`` defaults to the federation's mode; ``trust_ca=False`` leaves out
        ``--root-certificates`` (the node then trusts only the system's CAs); ``key``: its private
        key for SuperNode authentication (``None``: none); ``extra``: more flags."""
        assert self.port is not None, "start the SuperLink first"
        tls = self.secure if tls is None else tls
        if tls:
            assert self.material is not None or not trust_ca
            security = ["--root-certificates", str(self.material.ca_cert)] if trust_ca and self.material else []
        else:
            security = ["--insecure"]
        if key is not None:
            security += ["--auth-supernode-private-key", str(key.private)]
        p = free_port()
        return self._spawn(
            name,
            [
                _bin("flower-supernode"),
                *security,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(p),
                "--node-config",
                node_config_text(node_config),
                *self._isolation(),
                *self._superexec_auth(),
                *(extra or []),
            ],
            threads=self.threads_per_node,
            port=p,
        )

    def _spawn_superexec(
        self, owner: Proc, name: str, port: int | None, threads: int | None = None, tls: bool = False
    ) -> None:
        """memfl's warm SuperExec for ``owner`` (started with ``--isolation process``). ``tls``: the
        Runtime API is the TLS SuperLink's (a SuperNode's own Runtime API is plain HTTP on 127.0.0.1)."""
        security = ["--root-certificates", str(self.material.ca_cert)] if tls and self.material else ["--insecure"]
        proc = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "memfl.runtime.flower.superexec",
                *security,
                "--runtime-api-address",
                f"127.0.0.1:{port}",
                "--parent-pid",
                str(owner.popen.pid),
                *self._superexec_auth(),
            ],
            threads=threads,
        )
        owner.companions.append(proc)

    def _wait_health(self, proc: Proc, deadline: float, tls: bool = False) -> None:
        url = f"{'https' if tls else 'http'}://127.0.0.1:{proc.port}/health"
        opener = _NO_PROXY
        if tls:
            assert self.material is not None
            context = ssl.create_default_context(cafile=str(self.material.ca_cert))
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
            )
        while True:
            if not proc.alive():
                raise FlowerError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}")
            try:
                with opener.open(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise FlowerError(f"{proc.name} not healthy at {url} in time:\n{proc.tail()}")
            time.sleep(0.3)

    def online_nodes(self) -> list[int]:
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=30)
        try:
            nodes = json.loads(res.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return []
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def _wait_nodes_online(self, n: int, deadline: float) -> None:
        while True:
            if len(self.online_nodes()) >= n:
                return
            dead = [
                p
                for p in [
                    *self.supernodes,
                    *(self.superlink.companions if self.superlink else []),
                    *(c for node in self.supernodes for c in node.companions),
                ]
                if not p.alive()
            ]
            if dead:
                raise FlowerError(f"{dead[0].name} exited with status {dead[0].popen.returncode}:\n{dead[0].tail()}")
            if time.monotonic() > deadline:
                raise FlowerError(f"not all {n} SuperNodes came online in time; see {self.logs}")
            time.sleep(0.5)

    def stop_node(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to SuperNode ``i``'s process group and its SuperExec's (a node dying mid-round)."""
        self.supernodes[i].signal(sig)

    def stop(self) -> None:
        """Stop every process this federation started (nodes first); idempotent. All are asked
        to stop (SIGTERM) before any is waited for, so they shut down in parallel."""
        procs = [*self.supernodes, *([self.superlink] if self.superlink else [])]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.stop()

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self.secure:  # throw-away: the CA and the keys are worth nothing without this SuperLink
            shutil.rmtree(self.secrets, ignore_errors=True)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- runs -----------------------------------------------------------------------------
    def run(
        self, app_dir: str | Path, *, timeout: float = 600.0, on_line: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """``flwr run APP local``; stream its logs; return ``flwr ls`` facts about the finished run.

        Raises :class:`FlowerError` when the run fails or does not finish within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        started = time.perf_counter()
        res = self.flwr("run", str(Path(app_dir).absolute()), CONNECTION, "--format", "json", timeout=120)
        try:
            run_id = int(json.loads(res.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise FlowerError(
                f"flwr run failed (status {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
            ) from None
        log_path = self.logs / f"run-{run_id}.log"
        stream = subprocess.Popen(
            [_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.workdir,
            start_new_session=True,
        )
        reader = threading.Thread(target=_pump, args=(stream, log_path, on_line), daemon=True)
        reader.start()
        try:
            info: dict[str, Any] = {}
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.flwr("stop", str(run_id), CONNECTION, timeout=30)
                    raise FlowerError(f"run {run_id} did not finish within {timeout:.0f} s; log: {log_path}")
                try:
                    stream.wait(min(remaining, 5.0))
                except subprocess.TimeoutExpired:
                    if self.superlink is not None and not self.superlink.alive():
                        raise FlowerError(f"the SuperLink died:\n{self.superlink.tail()}") from None
                    for proc in self.superlink.companions if self.superlink is not None else []:
                        if not proc.alive():  # nothing would start the ServerApp
                            raise FlowerError(f"the SuperLink's {proc.name} died:\n{proc.tail()}") from None
                    continue
                info = self.run_info(run_id)
                if str(info.get("status", "")).startswith("finished"):
                    break
                time.sleep(2.0)  # the log stream ended early: poll the status
        finally:
            Proc("flwr-log", stream, log_path).stop(grace=2.0)
            reader.join(2.0)
        info["wall_seconds"] = time.perf_counter() - started
        info["log"] = str(log_path)
        if info.get("status") != "finished:completed":
            raise FlowerError(
                f"run {run_id} ended {info.get('status')!r} ({info.get('status-details')}); "
                f"log: {log_path}\n{_tail(log_path)}"
            )
        return info

    def run_info(self, run_id: int) -> dict[str, Any]:
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=30)
        try:
            runs = json.loads(res.stdout).get("runs", [])
        except json.JSONDecodeError:
            return {}
        return next((r for r in runs if int(r["run-id"]) == run_id), {})


def _pump(proc: subprocess.Popen, path: Path, on_line: Callable[[str], None] | None) -> None:
    with open(path, "w") as fh:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            fh.write(line)
            fh.flush()
            if on_line is not None:
                on_line(line.rstrip("\n"))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------
def federation_node_configs(config: Config, nodes: int) -> list[dict[str, Any]]:
    """Node ``i`` as client ``i`` of the simulator: partition, device and memory budget.

    The budgets are the simulator's (:func:`memfl.server.setup.build_federation`), declared in
    MiB as exact floats so that ``budget_bytes`` arrives unchanged.
    """
    from memfl.core.protocol import Plan
    from memfl.server.setup import build_federation, load_data, make_context, model_builder

    data = load_data(config)
    model_fn = model_builder(config, data.input_shape, data.num_classes)
    full_peak = make_context(config, data.input_shape, data.num_classes, model_fn).peak_fn(Plan())
    clients = build_federation(config, data, full_peak)
    return [
        {
            "partition-id": c.info.id,
            "num-partitions": nodes,
            "memory-mb": c.info.budget_bytes / 2**20,
            "device": c.info.device,
        }
        for c in clients[:nodes]
    ]


def local_settings(config: Config, nodes: int, *, round_timeout: float = 600.0) -> AppSettings:
    """The app settings of ``memfl flower local``: clients = nodes, an absolute ``out``."""
    cfg = config.to_json(set_only=True)
    cfg.setdefault("run", {})["clients"] = nodes
    cfg["run"]["out"] = str(Path(config.run.out).absolute())
    return AppSettings(
        config=build_config(cfg, source="memfl flower local"),
        min_nodes=nodes,
        wait_nodes=60.0,
        query_timeout=60.0,
        round_timeout=round_timeout,
    )


def run_local(
    config: Config,
    nodes: int,
    *,
    timeout: float = 1800.0,
    round_timeout: float = 600.0,
    workdir: str | Path | None = None,
    log: Callable[[str], None] = print,
    node_configs: list[dict[str, Any]] | None = None,
    warm: bool = True,
    secure: bool = False,
) -> dict[str, Any]:
    """Run ``config`` on a SuperLink and ``nodes`` SuperNodes on 127.0.0.1; return results.json.

    The whole job (start, run, stop) is bounded by ``timeout`` seconds; the processes are stopped
    whatever happens. ``node_configs`` overrides the simulator-derived node identities. ``warm``:
    see :class:`LocalFederation` (False: Flower's own SuperExec, a fresh process per message).
    ``secure``: TLS and SuperNode authentication with throw-away keys (:class:`LocalFederation`).
    """
    if nodes < 1:
        raise ValueError("--nodes must be >= 1")
    deadline = time.monotonic() + timeout
    settings = local_settings(config, nodes, round_timeout=round_timeout)
    node_configs = node_configs or federation_node_configs(settings.config, nodes)
    fed = LocalFederation(node_configs, workdir=Path(workdir) if workdir else None, log=log, warm=warm, secure=secure)
    _check_keys_apart(fed, settings)
    with fed, _terminate_as_interrupt():
        fed.start(timeout=max(10.0, deadline - time.monotonic()))
        return run_on(fed, settings, timeout=max(10.0, deadline - time.monotonic()), log=log)


def run_on(
    fed: LocalFederation,
    settings: AppSettings,
    *,
    timeout: float = 1800.0,
    log: Callable[[str], None] = print,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the app for ``settings`` on a started federation; return its results.json (with the
    Flower run's id, status and traffic added under ``flower_run``)."""
    _check_keys_apart(fed, settings)
    out = Path(settings.config.run.out)
    app_dir = write_app(fed.workdir / f"app-{time.time_ns()}", settings)
    info = fed.run(app_dir, timeout=timeout, on_line=on_line or _forward(log))
    results = json.loads((out / "results.json").read_text())
    results["flower_run"] = {
        k: info.get(k)
        for k in ("run-id", "status", "elapsed", "network-traffic", "compute-time", "wall_seconds", "log")
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _check_keys_apart(fed: LocalFederation, settings: AppSettings) -> None:
    """Refuse a results folder that holds the federation's keys, or lies inside their folder."""
    if not fed.secure:
        return
    out = Path(settings.config.run.out).absolute().resolve()
    keys = fed.secrets.absolute().resolve()
    if keys.is_relative_to(out) or out.is_relative_to(keys):
        raise FlowerError(f"the results folder {out} and the key folder {keys} overlap: give another --workdir")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so that the processes are still stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _forward(log: Callable[[str], None]) -> Callable[[str], None]:
    """Pass the ServerApp's own progress lines through; Flower's chatter stays in the log file."""
    keep = ("round ", "memfl on Flower", "results in", "node ", "only ", "resuming", "Traceback", "Error")

    def on_line(line: str) -> None:
        if any(k in line for k in keep):
            log(line)

    return on_line
