"""A warm SuperExec: Flower's ``flower-superexec`` that forks its ClientApps instead of starting them.

Flower's SuperExec starts a fresh ``flwr-clientapp`` (``flwr-serverapp``) process for every task:
on a SuperNode that is one new Python process per message, and each one imports torch, flwr and
memfl again. On the 2-core development machine that is 4-10 s per message, more than the local
training of a small model; on a Raspberry Pi it is worse.

``python -m memfl.runtime.flower.superexec`` is the same ``flower-superexec`` (same flags, same
Runtime API, same task protocol, same Flower code running the app), with one difference: the
process imports torch, flwr and memfl's apps once, and starts each ClientApp/ServerApp task by
``fork()``-ing itself and calling Flower's own ``flwr-clientapp`` / ``flwr-serverapp`` entry point in
the child, with the arguments Flower's ``SubprocessExecutor`` would pass. Each task still runs in its
own process, which exits when the task ends: nothing is shared between tasks but the imported
modules (so memfl's apps see the code as it was when the SuperExec started). Other task types are
started as Flower starts them.

Use it with Flower's ``process`` isolation, which leaves starting the SuperExec to you::

    flower-supernode --insecure --superlink HOST:9092 --isolation process --port 9094 \\
        --node-config 'partition-id=0 memory-mb=512'
    python -m memfl.runtime.flower.superexec --insecure --runtime-api-address 127.0.0.1:9094

(and likewise ``flower-superlink --isolation process`` with the SuperExec pointed at the
SuperLink's port, for the ServerApp). ``memfl flower local`` does this unless ``--cold``.

POSIX only (``fork``). The parent never runs torch computations, so no thread pool exists when it
forks; the flwr/gRPC objects the children use are created in the children.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import traceback
from typing import Any, Callable

#: imported once in the SuperExec, before any fork (what a fresh ClientApp spends its start on)
PRELOAD = (
    "torch",
    "torch.optim",
    "torch._dynamo",  # the first optimizer.step() of a fresh process imports it (seconds)
    "memfl.runtime.flower.client_app",
    "memfl.runtime.flower.server_app",
    "memfl.runtime.sim",
    "memfl.core.trainer",
    "memfl.methods",
    "memfl.server.setup",
)


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``modules``; return the names that failed (a node without some extra still runs)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module must not stop the node
            failed.append(name)
    return failed


def _entry_points() -> dict[Any, Callable[[], None]]:
    from flwr.supercore.constant import TaskType
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    return {TaskType.CLIENT_APP: flwr_clientapp, TaskType.SERVER_APP: flwr_serverapp}


def _make_executor_class():
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    class ForkExecutor(SubprocessExecutor):
        """Flower's SubprocessExecutor, except that ClientApp/ServerApp tasks run in a fork."""

        def __init__(self) -> None:
            self.owner = os.getpid()
            self.children: set[int] = set()
            self.entries = _entry_points()

        @staticmethod
        def argv(spec: ExecutionSpec) -> list[str]:
            """Exactly the command line ``SubprocessExecutor.launch`` runs for ``spec``."""
            argv = [
                TASK_TYPE_TO_COMMAND[spec.task_type],
                TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                spec.runtime_api_address,
                "--token",
                spec.token,
            ]
            if spec.insecure:
                argv.append("--insecure")
            elif spec.root_certificates_path is not None:
                argv += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                argv += ["--parent-pid", str(spec.parent_pid)]
            if spec.runtime_dependency_install:
                argv.append("--allow-runtime-dependency-installation")
            return argv

        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            entry = self.entries.get(spec.task_type)
            if entry is None:
                return super().launch(spec)
            argv = self.argv(spec)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as err:
                return LaunchResult.failed(f"fork failed: {err}")
            if pid == 0:  # the task process
                _run_child(entry, argv, spec.suppress_output)
            self.children.add(pid)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            """Reap finished task processes (no zombies)."""
            for pid in list(self.children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self.children.discard(pid)

        def close(self) -> None:
            # tasks end on their own: each watches this process (--parent-pid) as Flower's do
            if os.getpid() == self.owner:
                self.reconcile()

    return ForkExecutor


def fork_executor_class():
    """The executor class (built on first use: it subclasses Flower's ``SubprocessExecutor``)."""
    global _EXECUTOR_CLASS
    if _EXECUTOR_CLASS is None:
        _EXECUTOR_CLASS = _make_executor_class()
    return _EXECUTOR_CLASS


_EXECUTOR_CLASS = None


def _run_child(entry: Callable[[], None], argv: list[str], quiet: bool) -> None:
    """Body of a forked task process: Flower's entry point, then exit (never returns)."""
    code = 0
    try:
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        sys.argv = argv
        entry()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, then exit like a crashed process
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """``flower-superexec`` with forked, pre-imported ClientApp/ServerApp processes."""
    if not hasattr(os, "fork"):
        raise SystemExit("memfl's warm SuperExec needs fork(); use flower-superexec on this platform")
    failed = preload()
    if failed:
        print(f"memfl warm SuperExec: could not preload {', '.join(failed)}", file=sys.stderr, flush=True)
    if threading.active_count() > 1:  # pragma: no cover - a preloaded module started a thread
        print(
            f"memfl warm SuperExec: threads running before fork: {[t.name for t in threading.enumerate()]}",
            file=sys.stderr,
            flush=True,
        )

    import flwr.supercore.superexec.run_superexec as run_superexec_module
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import ExecutorType

    executor_class = fork_executor_class()
    original = run_superexec_module.get_executor

    def get_executor(executor_type, executor_config=None, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return executor_class()
        return original(executor_type, executor_config, **kwargs)

    run_superexec_module.get_executor = get_executor
    sys.argv = ["flower-superexec", *(sys.argv[1:] if argv is None else argv)]
    flower_superexec()


if __name__ == "__main__":
    main()
