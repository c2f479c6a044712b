"""A small blocking policy client, for ``policyd check`` and scripts."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from policyd.errors import PolicydError, UsageError


def split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a Twisted endpoint string into positional and keyword parts (``\\:`` escapes)."""
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    positional = [p for p in parts if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts if "=" in p)
    return positional, keywords


def client_address(listen: str) -> tuple[str, int] | str:
    """Where to reach a server listening on ``listen`` (a server endpoint string).

    :raises UsageError: for endpoints a client cannot derive (systemd sockets).
    """
    positional, keywords = split_endpoint(listen)
    kind = positional[0] if positional else ""
    if kind in ("tcp", "tcp6"):
        port = keywords.get("port") or (positional[1] if len(positional) > 1 else "")
        host = keywords.get("interface") or ("::1" if kind == "tcp6" else "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - listening on all: reach it locally
            host = "127.0.0.1" if kind == "tcp" else "::1"
        if not port.isdigit():
            raise UsageError(f"cannot find the port in listen.policy {listen!r}")
        return host, int(port)
    if kind == "unix":
        path = keywords.get("address") or (positional[1] if len(positional) > 1 else "")
        return path
    raise UsageError(f"cannot connect to {listen!r}: give --server HOST:PORT or a socket path")


def parse_server(text: str) -> tuple[str, int] | str:
    """``HOST:PORT``, ``[V6]:PORT`` or a unix socket path."""
    if text.startswith("/"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--server {text!r}: expected HOST:PORT or a socket path")
    return host.strip("[]") or "127.0.0.1", int(port)


def ask(server: tuple[str, int] | str, attributes: Mapping[str, str], timeout: float = 10.0) -> str:
    """Send one request and return the reply's action (``DUNNO``, ``REJECT 5.7.1 ...``).

    :raises PolicydError: when the server cannot be reached or answers badly.
    """
    for name, value in attributes.items():
        if "\n" in name or "\n" in value or "=" in name:
            raise UsageError(f"attribute {name!r} cannot hold '=' in its name or a line break")
    request = "".join(f"{k}={v}\n" for k, v in attributes.items()) + "\n"
    where = server if isinstance(server, str) else f"{server[0]}:{server[1]}"
    try:
        if isinstance(server, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(server)
        else:
            sock = socket.create_connection(server, timeout=timeout)
        with sock:
            sock.sendall(request.encode("utf-8"))
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as error:
        raise PolicydError(f"policy server {where}: {error.strerror or error}") from None
    line = reply.decode("utf-8", "replace").strip()
    if not line.startswith("action="):
        raise PolicydError(f"policy server {where} closed the connection without a reply")
    return line[len("action=") :]
