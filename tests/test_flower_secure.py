"""The secure Flower recipe end to end on 127.0.0.1: TLS and SuperNode authentication.

One secure federation (``LocalFederation(secure=True)``: a throw-away CA, a server certificate for
127.0.0.1, two registered node key pairs, memfl's warm SuperExec) serves the module. Against it:

- a SuperNode whose key was never registered (refused; the round completes without it);
- Fleet API calls that claim a registered node's id with the wrong key, a bad signature or none;
- SuperNodes that dial the TLS SuperLink in clear text, or with TLS but without trusting its CA;
- the files: keys ``0600`` in a ``0700`` folder, none of them in the results folder.

The default run keeps the refused stranger, the forged Fleet calls, a clear-text node and the file
checks (one federation start, one round). Slow (``make test-all``): the other two connection
attacks, the same round on an insecure federation giving bit-identical parameters, and
``memfl flower local --secure --cold`` end to end (Flower's own SuperExec over TLS).
Every process is bounded (``--max-retries``/``--max-wait-time``, a wait with a deadline) and stopped.
"""

from __future__ import annotations

import json
import shutil
import stat
import time
from base64 import b64encode
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
from memfl.runtime.flower.local import _bin  # noqa: E402

if shutil.which(_bin("flower-superlink")) is None:  # pragma: no cover - flwr installed without its scripts
    pytest.skip("flower-superlink is neither beside this Python nor on PATH", allow_module_level=True)

from memfl.config import build_config  # noqa: E402
from memfl.runtime.flower.local import (  # noqa: E402
    FlowerError,
    LocalFederation,
    federation_node_configs,
    local_settings,
    run_on,
)
from memfl.runtime.flower.secure import check_private, generate, node_key  # noqa: E402

NODES = 2
SEED = 7
RUN_TIMEOUT = 300.0
#: a SuperNode that should be refused must give up by itself within this (and is then killed)
REFUSED_WITHIN = 90.0
#: flags that bound a SuperNode's reconnection attempts
BOUNDED = ["--max-retries", "2", "--max-wait-time", "20"]


def make_config(out, **run):
    return build_config(
        {
            "run": {
                "method": "fedavg",
                "model": "cnn",
                "dataset": "synthetic",
                "clients": NODES,
                "per_round": NODES,
                "rounds": 1,
                "partition": "iid",
                "budgets": "relative:1.2-1.5",
                "seed": SEED,
                "out": str(out),
                "model_width": 0.25,
                **run,
            },
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "max_steps": 3},
        }
    )


def _params(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint.safetensors"))


@pytest.fixture(scope="module")
def secure_fed(tmp_path_factory):
    work = tmp_path_factory.mktemp("flower-secure")
    nodes = federation_node_configs(make_config(work / "unused"), NODES)
    fed = LocalFederation(nodes, workdir=work / "work", secure=True)
    with pytest.MonkeyPatch.context() as mp, fed:
        mp.setenv("XDG_CACHE_HOME", str(work / "cache"))
        fed.start(timeout=180)
        yield fed


@pytest.fixture(scope="module")
def secure_run(secure_fed, tmp_path_factory):
    """One round on the secure federation while a SuperNode with an unregistered key tries to join."""
    out = tmp_path_factory.mktemp("secure-results") / "out"
    stranger_key = node_key(secure_fed.workdir / "stranger-keys", "stranger")
    stranger = secure_fed.spawn_supernode("stranger", {"partition-id": 0}, key=stranger_key, extra=BOUNDED)
    try:
        res = run_on(secure_fed, local_settings(make_config(out), NODES, round_timeout=120), timeout=RUN_TIMEOUT)
        stranger.popen.wait(REFUSED_WITHIN)
    finally:
        stranger.stop(grace=2.0)
    return {"res": res, "out": out, "stranger": stranger}


def _wait_exit(proc, within: float) -> int:
    deadline = time.monotonic() + within
    try:
        while proc.alive():
            assert time.monotonic() < deadline, f"{proc.name} still running after {within:.0f} s:\n{proc.tail()}"
            time.sleep(0.2)
        return proc.popen.returncode
    finally:
        proc.stop(grace=2.0)


# -- fast (default run) -------------------------------------------------------------------------
def test_unregistered_node_is_refused_and_the_round_completes_without_it(secure_fed, secure_run):
    res, stranger = secure_run["res"], secure_run["stranger"]
    # the round ran with the two registered nodes only
    assert res["flower_run"]["status"] == "finished:completed"
    (rnd,) = res["rounds"]
    assert {c["id"]: c["status"] for c in rnd["clients"]} == {0: "ok", 1: "ok"}
    assert {c["node_id"] for c in res["clients"]} == set(secure_fed.node_ids)
    # the stranger gave up by itself, refused at activation, and never received an instruction
    assert stranger.popen.returncode not in (None, 0)
    log = stranger.log.read_text(errors="replace")
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert "Receiving" not in log and "SuperNode ID" not in log
    # the SuperLink says so, and it lists only the registered nodes
    superlink_log = secure_fed.superlink.log.read_text(errors="replace")
    assert "[/v1/fleet/activate-node][ApiError:2004]" in superlink_log
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in superlink_log
    listed = json.loads(secure_fed.flwr("supernode", "ls", "local", "--format", "json").stdout)["nodes"]
    assert sorted(int(n["node-id"]) for n in listed) == sorted(secure_fed.node_ids)


def _fleet_post(fed, path: str, request, headers: dict[str, str]) -> int:
    import ssl

    import httpx

    context = ssl.create_default_context(cafile=str(fed.material.ca_cert))
    with httpx.Client(verify=context, trust_env=False, timeout=20) as client:
        r = client.post(
            f"https://127.0.0.1:{fed.port}{path}",
            content=request.SerializeToString(),
            headers={"content-type": "application/protobuf", **headers},
        )
    return r.status_code


def test_fleet_calls_with_a_stolen_node_id_or_a_bad_signature_are_rejected(secure_fed, tmp_path):
    """Pull a registered node's messages while holding another key: 401, whatever the headers say."""
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    def load(path):
        return serialization.load_ssh_private_key(Path(path).read_bytes(), None)

    victim = secure_fed.node_ids[0]
    request = PullMessagesRequest(node=Node(node_id=victim))
    attacker = load(node_key(tmp_path / "keys", "attacker").private)
    registered = load(secure_fed.material.nodes[0].private)

    def headers(signer, claimed_public, timestamp=None):
        ts = timestamp or now().isoformat()
        return {
            "flwr-public-key": b64encode(public_key_to_bytes(claimed_public)).decode(),
            "flwr-timestamp": ts,
            "flwr-signature": b64encode(sign_message(signer, ts.encode())).decode(),
        }

    path = "/v1/fleet/pull-messages"
    # the attacker's own key, claiming the victim's node id
    assert _fleet_post(secure_fed, path, request, headers(attacker, attacker.public_key())) == 401
    # the victim's public key, signed with the attacker's key
    assert _fleet_post(secure_fed, path, request, headers(attacker, registered.public_key())) == 401
    # no authentication headers at all
    assert _fleet_post(secure_fed, path, request, {}) == 401
    # a stale timestamp, correctly signed by the registered key (a replay older than Flower's window)
    old = "2020-01-01T00:00:00+00:00"
    assert _fleet_post(secure_fed, path, request, headers(registered, registered.public_key(), old)) == 401
    # control: the same call signed by the registered key is accepted (so the 401s are the auth's)
    assert _fleet_post(secure_fed, path, request, headers(registered, registered.public_key())) == 200


@pytest.mark.parametrize(
    "how, code, expected",
    [
        # clear text to the TLS port: the SuperLink's TLS server drops the connection; which side of
        # the drop the client sees first is timing (both seen on this host)
        ("plain", 305, ("Server disconnected without sending a response", "Connection reset by peer")),
        # clear text with a registered key: flower-supernode refuses to send its identity unencrypted
        pytest.param(
            "plain-with-key", 303, "SuperNode authentication requires a secure TLS connection", marks=pytest.mark.slow
        ),
        # TLS, but without the CA: the node does not trust the SuperLink's certificate
        pytest.param("untrusted", 305, "CERTIFICATE_VERIFY_FAILED", marks=pytest.mark.slow),
    ],
)
def test_a_node_without_tls_or_without_the_ca_cannot_connect(secure_fed, how, code, expected):
    key = secure_fed.material.nodes[0] if how != "plain" else None  # a registered key
    tls = {"tls": False} if how.startswith("plain") else {"tls": True, "trust_ca": False}
    proc = secure_fed.spawn_supernode(f"node-{how}", {"partition-id": 0}, key=key, extra=BOUNDED, **tls)
    exit_code = _wait_exit(proc, REFUSED_WITHIN)
    log = proc.log.read_text(errors="replace")
    assert exit_code == 1 and f"Exit Code: {code}" in log, log[-2000:]  # Flower's exit codes (ref-exit-codes)
    alternatives = expected if isinstance(expected, tuple) else (expected,)
    assert any(e in log for e in alternatives), log[-2000:]
    if code == 305:
        assert "Failed to initialize the connection to the SuperLink" in log
    assert "SuperNode ID" not in log


def test_keys_are_private_and_never_in_the_results(secure_fed, secure_run):
    m = secure_fed.material
    assert m.folder == secure_fed.secrets
    assert stat.S_IMODE(m.folder.stat().st_mode) == 0o700
    files = m.files()
    assert {p.name for p in files} >= {"ca.crt", "ca.key", "server.pem", "server.key", "node-0", "node-0.pub"}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [(p, oct(p.stat().st_mode)) for p in files]
    assert check_private(m.folder) == []
    out = secure_run["out"]
    assert not m.folder.resolve().is_relative_to(out.resolve())
    secret_bytes = {p.read_bytes() for p in files if p.suffix != ".pub" and p.name not in ("ca.crt", "server.pem")}
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"PRIVATE KEY" not in data, p
            assert not any(s in data for s in secret_bytes), p
    # and a results folder that would hold the keys is refused before anything starts
    settings = local_settings(make_config(secure_fed.workdir), NODES)
    with pytest.raises(FlowerError, match="overlap"):
        run_on(secure_fed, settings)


def test_generated_material_is_what_flower_accepts(tmp_path):
    """The certificate names 127.0.0.1/localhost and chains to the CA; the node keys are P-384 OpenSSH."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    m = generate(tmp_path / "s", 1)
    ca = x509.load_pem_x509_certificate(m.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(m.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    public = serialization.load_ssh_public_key(m.nodes[0].public.read_bytes())
    assert uses_nist_ec_curve(public) and public.curve.name == "secp384r1"
    private = serialization.load_ssh_private_key(m.nodes[0].private.read_bytes(), None)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert check_private(m.folder) == []
    # for a real server (docs/FLOWER.md, step 2): its name first, loopback kept
    named = generate(tmp_path / "named", 0, names=("flower.example.org",))
    sans = x509.load_pem_x509_certificate(named.server_cert.read_bytes()).extensions
    dns = sans.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert dns == ["flower.example.org", "localhost"] and named.nodes == []


# -- slow (make test-all) -----------------------------------------------------------------------
@pytest.mark.slow
def test_secure_round_gives_the_insecure_rounds_parameters(secure_fed, secure_run, tmp_path):
    """Same config and seed on an insecure federation: bit-identical aggregated parameters."""
    out = tmp_path / "insecure"
    fed = LocalFederation(secure_fed.node_configs, workdir=tmp_path / "work", secure=False)
    with pytest.MonkeyPatch.context() as mp, fed:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        fed.start(timeout=180)
        res = run_on(fed, local_settings(make_config(out), NODES, round_timeout=120), timeout=RUN_TIMEOUT)
    assert res["flower_run"]["status"] == "finished:completed"
    secure, insecure = _params(secure_run["out"]), _params(out)
    assert secure.keys() == insecure.keys()
    for k in secure:
        torch.testing.assert_close(secure[k], insecure[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert [c["plan"] for c in res["rounds"][0]["clients"]] == [
        c["plan"] for c in secure_run["res"]["rounds"][0]["clients"]
    ]


@pytest.mark.slow
def test_memfl_flower_local_secure_command(tmp_path):
    """``memfl flower local --secure --cold``: Flower's own SuperExec over TLS; keys deleted at the end."""
    from memfl.cli import main

    out, work = tmp_path / "res", tmp_path / "work"
    argv = ["flower", "local", "--secure", "--cold", "--nodes", "2", "--rounds", "1", "--dataset", "synthetic"]
    argv += ["--partition", "iid", "--budgets", "mb:100-200", "--max-steps", "2", "--model-width", "0.25"]
    argv += ["--out", str(out), "--workdir", str(work), "--timeout", "600"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["runtime"] == "flower" and res["flower_run"]["status"] == "finished:completed"
    assert {c["id"] for c in res["rounds"][0]["clients"] if c["status"] == "ok"} == {0, 1}
    assert not (work / "secrets").exists()  # throw-away: removed with the federation
    superlink_log = (work / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in superlink_log
    assert "SuperNode authentication is disabled" not in superlink_log
