"""
TEST FIXTURE ONLY: a local OAuth 2.0 identity provider for the OAUTHBEARER and
XOAUTH2 tests. An http.server in a thread serves, per tenant (a path prefix,
so tests sharing the session-scoped server do not see each other's state):

  - GET /TENANT/jwks: the tenant's JWKS (its public keys; a test may rotate them);
  - POST /TENANT/introspect: RFC 7662 introspection, HTTP Basic client auth,
    the answers the test registered per token (else {"active": false}).

Keys are generated here; tokens are signed here with PyJWT.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://idp.test.invalid/realm"
AUDIENCE = "popserv-test"


def rsaKey() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ecKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def publicJWK(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else None
    if algorithm is None:
        algorithm = jwt.algorithms.ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, use="sig")
    if alg:
        jwk["alg"] = alg
    return jwk


def token(
    key: Any,
    kid: str | None = "k1",
    *,
    alg: str = "RS256",
    lifetime: int = 300,
    **claims: Any,
) -> str:
    """A signed JWT for alice@example.org, ISSUER and AUDIENCE unless claims say otherwise."""
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "1234",
        "email": "alice@example.org",
        "iat": now,
        "exp": now + lifetime,
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def unsigned(**claims: Any) -> str:
    """`alg: none`: the same claims as token(), no signature."""
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "email": "alice@example.org", "exp": now + 300}
    body.update(claims)

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{part(body)}."


@dataclass
class Tenant:
    """One identity provider's state; `url(path)` is where the server serves it."""

    base: str
    keys: list[dict[str, Any]] = field(default_factory=list)
    introspection: dict[str, dict[str, Any]] = field(default_factory=dict)
    clientId: str = "popserv"
    clientSecret: str = "s3cret:/+"
    jwksFetches: int = 0
    introspections: int = 0

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _IdPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _tenant(self, endpoint: str) -> Tenant | None:
        name, _, rest = self.path.lstrip("/").partition("/")
        tenant = self.server.tenants.get(name)
        return tenant if tenant is not None and rest == endpoint else None

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        tenant = self._tenant("jwks")
        if tenant is None:
            return self._json(404, {"error": "not found"})
        tenant.jwksFetches += 1
        self._json(200, {"keys": list(tenant.keys)})

    def do_POST(self) -> None:
        tenant = self._tenant("introspect")
        length = int(self.headers.get("Content-Length", "0"))
        form = parse_qs(self.rfile.read(length).decode())
        if tenant is None:
            return self._json(404, {"error": "not found"})
        tenant.introspections += 1
        # RFC 6749 section 2.3.1: both parts form-encoded before Basic.
        pair = f"{quote(tenant.clientId, safe='')}:{quote(tenant.clientSecret, safe='')}"
        expected = "Basic " + base64.b64encode(pair.encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self._json(401, {"error": "invalid_client"})
        given = form.get("token", [""])[0]
        self._json(200, tenant.introspection.get(given, {"active": False}))


class _IdPServer(ThreadingHTTPServer):
    daemon_threads = True
    tenants: dict[str, Tenant]


class IdentityProvider:
    """The server; `tenant()` gives a fresh, empty identity provider under it."""

    def __init__(self) -> None:
        self._server = _IdPServer(("127.0.0.1", 0), _Handler)
        self._server.tenants = {}
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def tenant(self) -> Tenant:
        name = uuid.uuid4().hex[:12]
        tenant = Tenant(f"http://127.0.0.1:{self.port}/{name}")
        self._server.tenants[name] = tenant
        return tenant

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
