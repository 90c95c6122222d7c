"""TLS credentials from PEM files, for the gateway's and the replicas' servers and
for the gateway's links to the replicas.

A server with a certificate and key serves TLS; with a client CA as well it
requires every client to present a certificate signed by that CA (mutual TLS). A
client trusts the given CA (or the system's roots) and presents its own
certificate when one is set."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import grpc

from serve.config import TLSClientConfig, TLSServerConfig

logger = logging.getLogger(__name__)


def read_pem(path: str, what: str) -> bytes:
    """The PEM file's bytes; ValueError naming `what` when it is missing or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {path} is not PEM")
    return data


def server_credentials(tls: TLSServerConfig) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`; None when TLS is off."""
    if not tls.enabled:
        if tls.key_file or tls.client_ca_file:
            raise ValueError("TLS needs a certificate (--tls-cert) with its key and client CA")
        return None
    if not tls.key_file:
        raise ValueError("a TLS certificate needs its private key (--tls-key)")
    pair = (read_pem(tls.key_file, "TLS key"), read_pem(tls.cert_file, "TLS certificate"))
    client_ca = read_pem(tls.client_ca_file, "client CA") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(tls: TLSClientConfig) -> grpc.ChannelCredentials | None:
    """Credentials for a secure channel; None when TLS is off."""
    if not tls.enabled:
        if tls.key_file or tls.server_name:
            raise ValueError("client TLS needs a CA or a client certificate")
        return None
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca_file, "CA") if tls.ca_file else None,
        private_key=read_pem(tls.key_file, "client key") if tls.key_file else None,
        certificate_chain=read_pem(tls.cert_file, "client certificate") if tls.cert_file else None,
    )


def channel_options(tls: TLSClientConfig) -> list[tuple[str, str]]:
    """The server-name override, when the certificate's name differs from the address."""
    if tls.enabled and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


def describe(tls: TLSServerConfig) -> str:
    """'plaintext', 'TLS' or 'mutual TLS', for start-up logs."""
    if not tls.enabled:
        return "plaintext"
    return "mutual TLS" if tls.client_ca_file else "TLS"


def is_loopback(host: str) -> bool:
    """Whether `host` names a loopback address (a name other than localhost: False)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
