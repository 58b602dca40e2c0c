"""Who may talk to the server: the Host header (against DNS rebinding) and the API key, checked before any route.

    --api-key KEY (or COREMATCHING_API_KEY)   every route but /health needs `Authorization: Bearer KEY` (else 401)
    --allowed-hosts a,b                       requests whose Host header names another host get 400;
                                              by default the loopback names when the server binds to loopback

A web page on another site can make a browser send requests to 127.0.0.1 under its own host name once its DNS
answer changes to 127.0.0.1 (DNS rebinding); such requests carry that site's name in the Host header and are
refused here. The key is compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress

from .errors import APIError

OPEN_PATHS = frozenset({"/health"})  # answered without a key (load balancers, process managers)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def host_name(host: str) -> str:
    """'Example.COM:8000' -> 'example.com', '[::1]:8000' -> '[::1]', 'localhost.' -> 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


def is_loopback(bind_host: str) -> bool:
    if bind_host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(option: str | None, bind_host: str) -> frozenset[str] | None:
    """The host names the Host header may carry (None: any). option: the --allowed-hosts value."""
    if option is None:
        return frozenset(LOOPBACK_HOSTS) if is_loopback(bind_host) else None
    names = {host_name(name) for name in option.split(",") if name.strip()}
    if "*" in names:
        return None
    if not names:
        raise ValueError("--allowed-hosts is empty (give host names, or '*' for any)")
    return frozenset(names)


class Guard:
    """ASGI middleware: refuses a request with a Host outside `allowed_hosts` (400) or without the key (401)."""

    def __init__(self, app, api_key: str | None, allowed_hosts: frozenset[str] | None):
        if api_key is not None and not api_key.strip():
            raise ValueError("the API key is empty")
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal(scope)
            if refusal is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        hosts = [value for name, value in scope.get("headers", ()) if name == b"host"]
        if self.allowed_hosts is not None:
            if len(hosts) != 1 or host_name(hosts[0].decode("latin-1")) not in self.allowed_hosts:
                return APIError(400, "the Host header names a host this server does not answer for "
                                "(see --allowed-hosts)", code="host_not_allowed")
        if self.key is None or scope.get("path") in OPEN_PATHS:
            return None
        given = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
        scheme, _, token = (given[0] if len(given) == 1 else b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return APIError(401, "a valid API key is required: send `Authorization: Bearer <key>`",
                            code="invalid_api_key", kind="authentication_error")
        return None
