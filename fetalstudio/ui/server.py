"""Launch settings and their safety rules: local by default, never public unless asked, with auth."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fetalstudio.errors import FetalStudioError

LOOPBACK_NAMES = {"localhost"}


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    share: bool = False


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise FetalStudioError("--auth must be USER:PASSWORD, both non-empty (e.g. --auth sono:s3cret).")
    return user, password


def check_server_options(options: ServerOptions) -> ServerOptions:
    """Refuse to expose the app (other machines, or a public share link) without a password."""
    if not 1 <= options.port <= 65535:
        raise FetalStudioError(f"--port {options.port} is not a valid port (1-65535).")
    if not is_loopback(options.host) and options.auth is None:
        raise FetalStudioError(
            f"Refusing to listen on {options.host} without a password: anyone on the network could use the "
            "app and read its outputs. Add --auth USER:PASSWORD, or keep the default --host 127.0.0.1."
        )
    if options.share and options.auth is None:
        raise FetalStudioError("--share makes the app reachable from the internet; it needs --auth USER:PASSWORD.")
    return options
