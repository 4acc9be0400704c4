"""Certificates made at test time with the openssl command: a CA, a broker certificate for
127.0.0.1 and localhost, a client certificate signed by the same CA, and an unrelated CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
SERVER_EXT = ("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
              "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
              "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
CLIENT_EXT = ("extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n"
              "keyUsage=critical,digitalSignature\n"
              "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # signed nothing here: "the wrong CA"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", *EC_KEY, "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN=edge-agent test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _issue(folder: Path, name: str, cn: str, ext: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, csr, ext_file = (folder / f"{name}.crt", folder / f"{name}.key",
                                folder / f"{name}.csr", folder / f"{name}.ext")
    ext_file.write_text(ext)
    _openssl("req", "-new", *EC_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext_file)
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Writes the files into `folder`, every one readable by all: mosquitto drops from root to
    its own user before it reads them. Test keys only."""
    ca = _make_ca(folder, "ca")
    other_ca, _ = _make_ca(folder, "other-ca")
    server = _issue(folder, "server", "127.0.0.1", SERVER_EXT, ca)
    client = _issue(folder, "client", "edge-agent-client", CLIENT_EXT, ca)
    for path in folder.iterdir():
        path.chmod(0o644)
    return Pki(ca[0], server[0], server[1], client[0], client[1], other_ca)
