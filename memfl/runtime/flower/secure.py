"""Throw-away TLS and SuperNode-authentication material for a Flower federation on 127.0.0.1.

:func:`generate` writes, with the ``cryptography`` package (a Flower dependency; no ``openssl``):

- ``ca.crt`` / ``ca.key``: a self-signed CA (EC P-384), valid for a day;
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by that CA, for
  ``localhost`` and ``127.0.0.1`` (the names the nodes, the ``flwr`` CLI and the SuperLink's own
  SuperExec dial);
- ``node-I`` / ``node-I.pub``: one EC P-384 key pair per SuperNode in OpenSSH format, what
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` takes.

Everything lands in one folder made private to its owner (``0700``); every file in it, the
certificates included, is ``0600``. Nothing here is meant to outlive the federation that uses it:
:class:`memfl.runtime.flower.local.LocalFederation` writes it under its work folder and removes it
with a temporary one. On real machines, follow docs/FLOWER.md (the CA key stays on the server, a
node's private key on its device).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: names the SuperLink's certificate covers by default (loopback: what its own SuperExec dials)
SERVER_NAMES = ("localhost", "127.0.0.1")
_CURVE = ec.SECP384R1


@dataclass
class NodeKey:
    """One SuperNode's key pair: ``private`` (OpenSSH PEM) and ``public`` (``ecdsa-sha2-nistp384 …``)."""

    name: str
    private: Path
    public: Path


@dataclass
class SecureMaterial:
    """Paths of the files :func:`generate` wrote."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: list[NodeKey] = field(default_factory=list)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def private_folder(path: str | Path) -> Path:
    """Create ``path`` (and parents) and make it ``0700``; refuse a symlink or someone else's folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{folder} is not a plain folder")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ValueError(f"{folder} belongs to another user")
    folder.chmod(0o700)
    return folder


def _write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh ``0600`` file (created with that mode: never readable by others)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    fmt = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def node_key(folder: str | Path, name: str) -> NodeKey:
    """A fresh SuperNode key pair ``folder/name`` and ``folder/name.pub`` (OpenSSH format, P-384)."""
    folder = private_folder(folder)
    key = ec.generate_private_key(_CURVE())
    fmt = serialization.PrivateFormat.OpenSSH
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    private = _write_private(folder / name, pem)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKey(name, private, _write_private(folder / f"{name}.pub", public + f" {name}\n".encode()))


def generate(
    folder: str | Path, nodes: int, *, days: int = 1, names: tuple[str, ...] = (), node_prefix: str = "node-"
) -> SecureMaterial:
    """A CA, a server certificate and ``nodes`` node key pairs in the private ``folder``.

    The certificate covers ``names`` (host names or IP addresses, e.g. ``flower.example.org``)
    and always ``localhost`` and ``127.0.0.1``."""
    folder = private_folder(folder)
    now = _dt.datetime.now(_dt.timezone.utc)
    start, end = now - _dt.timedelta(minutes=5), now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "memfl throw-away CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(_CURVE())
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, *SERVER_NAMES]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (*names, "localhost")[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    material = SecureMaterial(
        folder=folder,
        ca_cert=_write_private(folder / "ca.crt", ca_cert.public_bytes(pem)),
        ca_key=_write_private(folder / "ca.key", _pem_key(ca_key)),
        server_cert=_write_private(folder / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write_private(folder / "server.key", _pem_key(server_key)),
    )
    material.nodes = [node_key(folder, f"{node_prefix}{i}") for i in range(nodes)]
    return material


def check_private(folder: str | Path) -> list[str]:
    """Problems with ``folder``'s privacy: the folder not ``0700``, a file readable by others."""
    folder = Path(folder)
    problems = []
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        problems.append(f"{folder}: mode {mode:o}")
    for p in folder.iterdir():
        m = stat.S_IMODE(p.lstat().st_mode)
        if m & 0o077:
            problems.append(f"{p}: mode {m:o}")
    return problems


def main(argv: list[str] | None = None) -> None:
    """``python -m memfl.runtime.flower.secure --out certs --nodes 2 --name flower.example.org``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m memfl.runtime.flower.secure",
        description="Write a CA, a SuperLink certificate and SuperNode key pairs into a private folder.",
    )
    parser.add_argument("--out", required=True, help="folder to write into (made 0700; files 0600)")
    parser.add_argument("--nodes", type=int, default=1, help="node key pairs to write (node-0, node-1, ...)")
    parser.add_argument(
        "--name", action="append", default=[], help="a name the nodes dial the SuperLink by (repeatable)"
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
    args = parser.parse_args(argv)
    m = generate(args.out, args.nodes, days=args.days, names=tuple(args.name))
    for p in m.files():
        print(p)


if __name__ == "__main__":
    main()
