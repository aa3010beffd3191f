"""A throwaway certificate authority for the TLS tests, made with the openssl command line.

Everything is generated fresh into a directory per test session: a CA, a server certificate for
``localhost`` and ``127.0.0.1``, client certificates (valid, expired, and one from another CA),
and a second CA that signed nothing the servers use (the "wrong CA" a client may be given).
RSA 2048 keys: quick enough to make, accepted by every TLS library here.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT_CN = "cdc_relay"  # sql/relay_role.sql's role


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """Files of one test PKI; paths are absolute."""

    root: Path
    ca: Path  # the CA the servers' certificates chain to
    other_ca: Path  # a CA that signed none of them
    server: Pair  # CN localhost, SAN DNS:localhost, IP:127.0.0.1
    server_wrong_name: Pair  # CN elsewhere.invalid: for the hostname check
    client: Pair  # CN cdc_relay (the PostgreSQL role and RabbitMQ user it maps to)
    client_expired: Pair
    client_foreign: Pair  # signed by other_ca
    client_key_password: str
    client_encrypted: Pair  # the client key encrypted with client_key_password


def _ca(root: Path, name: str) -> tuple[Path, Path]:
    key, cert = root / f"{name}.key", root / f"{name}.pem"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)),
        *("-out", str(cert), "-days", "30", "-subj", f"/CN={name}"),
        cwd=root,
    )
    return cert, key


def _issue(
    root: Path,
    name: str,
    cn: str,
    ca: tuple[Path, Path],
    days: int = 30,
    san: str | None = None,
) -> Pair:
    key, csr, cert = root / f"{name}.key", root / f"{name}.csr", root / f"{name}.pem"
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr)),
        *("-subj", f"/CN={cn}"),
        cwd=root,
    )
    args = ["x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1])]
    args += ["-CAcreateserial", "-out", str(cert), "-days", str(days)]
    if san is not None:
        ext = root / f"{name}.ext"
        ext.write_text(f"subjectAltName = {san}\n")
        args += ["-extfile", str(ext)]
    _openssl(*args, cwd=root)
    key.chmod(0o600)
    return Pair(cert, key)


def make_authority(root: Path) -> Authority:
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca(root, "test-ca")
    other = _ca(root, "other-ca")
    client = _issue(root, "client", CLIENT_CN, ca)
    password = "key-pass-Zq7"
    encrypted = root / "client-encrypted.key"
    _openssl(
        *("rsa", "-in", str(client.key), "-aes256", "-passout", f"pass:{password}"),
        *("-out", str(encrypted)),
        cwd=root,
    )
    encrypted.chmod(0o600)
    return Authority(
        root=root,
        ca=ca[0],
        other_ca=other[0],
        server=_issue(root, "server", "localhost", ca, san="DNS:localhost, IP:127.0.0.1"),
        server_wrong_name=_issue(
            root, "server-elsewhere", "elsewhere.invalid", ca, san="DNS:elsewhere.invalid"
        ),
        client=client,
        client_expired=_issue(root, "client-expired", CLIENT_CN, ca, days=-1),
        client_foreign=_issue(root, "client-foreign", CLIENT_CN, other),
        client_key_password=password,
        client_encrypted=Pair(client.cert, encrypted),
    )
