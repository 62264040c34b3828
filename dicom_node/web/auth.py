"""Who may use the web face, and what its access log may say.

* **Token**: one secret, read from ``web.auth.token_file`` or the environment
  variable ``web.auth.token_env`` at start-up (never from the config file, never
  logged, compared in constant time).  Accepted as ``Authorization: Bearer``
  (DICOMweb clients) or as the basic-auth password of ``web.auth.user``
  (browsers, which cannot send a bearer token to a page).  Required off
  loopback (``config.py`` refuses to start otherwise); on loopback it is
  enforced when configured.
* **Client allow-list**: ``web.allowed_hosts``, the same IP/CIDR idea as
  ``node.allowed_hosts`` on the DICOM side.
* **CSRF**: the POST actions use a double-submit token: a random cookie
  (``SameSite=Strict``, ``HttpOnly``) that must equal a hidden form field, and an
  ``Origin`` (when sent) that must be this server.  A web page elsewhere cannot
  read the cookie, so cannot forge the field.
* **Access log**: method, the *route template* (``/studies/{study_uid}``, never
  the UIDs or the query string), status, size, time and client address.  No
  header, no UID, no patient data.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Optional

from dicom_node.config import Config

access_log = logging.getLogger("dicom_node.web.access")

CSRF_COOKIE = "cag_csrf"
CSRF_FIELD = "csrf"


class AuthSetupError(OSError):
    """The configured token source is missing or empty (an OSError: ``serve`` reports it as
    "cannot start", like a port that is taken)."""


def load_token(config: Config) -> Optional[str]:
    a = config.web.auth
    if a.token_file:
        p = config.resolve(a.token_file)
        try:
            tok = Path(p).read_text(encoding="utf-8").splitlines()[0].strip() if Path(p).stat().st_size else ""
        except (OSError, IndexError) as exc:
            raise AuthSetupError(f"web.auth.token_file {p}: cannot read the token ({exc.__class__.__name__})") from None
        if not tok:
            raise AuthSetupError(f"web.auth.token_file {p}: empty")
        return tok
    if a.token_env:
        tok = (os.environ.get(a.token_env) or "").strip()
        if not tok:
            raise AuthSetupError(f"web.auth.token_env: environment variable {a.token_env} is unset or empty")
        return tok
    return None


def check_authorization(header: Optional[str], token: str, user: str) -> bool:
    """Does an ``Authorization`` header carry the token (bearer, or basic ``user:token``)?"""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer":
        return hmac.compare_digest(value.encode(), token.encode())
    if scheme == "basic":
        try:
            raw = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        u, sep, pw = raw.partition(":")
        ok_user = hmac.compare_digest(u.encode(), user.encode())
        ok_pw = hmac.compare_digest(pw.encode(), token.encode())
        return bool(sep) and ok_user and ok_pw
    return False


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(cookie: Optional[str], field: Optional[str]) -> bool:
    return bool(cookie) and bool(field) and hmac.compare_digest(cookie.encode(), field.encode())


def _client_allowed(host: Optional[str], networks) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)


async def _send_plain(send, status: int, text: str, extra: list = ()) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """ASGI middleware: client allow-list, token check, security headers, PHI-free access log."""

    def __init__(self, app, token: Optional[str], user: str, allowed_hosts: list[str], tls: bool):
        self.app = app
        self.token = token
        self.user = user
        self.networks = [ipaddress.ip_network(h, strict=False) for h in allowed_hosts]
        self.tls = tls

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        client = (scope.get("client") or ("-", 0))[0]
        state = {"status": 0, "bytes": 0}

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
                headers = list(msg.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")]
                if self.tls:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                msg = dict(msg, headers=headers)
            elif msg["type"] == "http.response.body":
                state["bytes"] += len(msg.get("body", b""))
            await send(msg)

        try:
            if not _client_allowed(client, self.networks):
                await _send_plain(send_logged, 403, "client address not allowed\n")
            elif self.token is not None and not check_authorization(_header(scope, b"authorization"),
                                                                   self.token, self.user):
                await _send_plain(send_logged, 401, "authentication required\n",
                                  [(b"www-authenticate", b'Basic realm="cag-node", charset="UTF-8"'),
                                   (b"www-authenticate", b'Bearer realm="cag-node"')])
            else:
                await self.app(scope, receive, send_logged)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("(unmatched)" if state["status"] == 404 else "(refused)")
            access_log.info("%s %s %s %d %dB %.1fms", client, scope.get("method", "-"), path, state["status"],
                            state["bytes"], (time.perf_counter() - t0) * 1000)


def _header(scope, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None
