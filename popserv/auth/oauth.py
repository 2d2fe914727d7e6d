"""
OAuth 2.0 bearer tokens (the SASL mechanisms OAUTHBEARER and XOAUTH2): who
an access token names, checked one of two ways.

  - L{JWKSValidator}: the token is a JWT whose signature is checked locally
    against the identity provider's published keys (a JWKS), with its
    issuer, audience and expiry. The keys are fetched over Twisted's HTTP
    client on a timer and when a token names a key (C{kid}) not seen yet,
    never with a blocking call on the reactor.
  - L{IntrospectionValidator}: the identity provider is asked about each
    token (RFC 7662 token introspection).

Either answers a Deferred of the user name (the configured claim) or fails
with L{InvalidToken} (the login fails: C{-ERR [AUTH]}) or with
L{TemporaryFailure} (the identity provider cannot be asked: C{[SYS/TEMP]}).
A token is a password: no message or log line here ever holds one.

JWTs are decoded with PyJWT, with the algorithms always given explicitly
(an allow-list; C{none} and the shared-secret C{HS*} algorithms can never be
in it, see L{checkAlgorithms}). A signature check costs tens of
microseconds, so it runs on the reactor.
"""

from __future__ import annotations

import base64
import json
import time
from io import BytesIO
from typing import Any
from urllib.parse import quote, urlencode

import jwt
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import Interface

from popserv.errors import TemporaryFailure

__all__ = [
    "ITokenValidator",
    "InvalidToken",
    "JWKSValidator",
    "IntrospectionValidator",
    "HTTPClient",
    "ALLOWED_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "checkAlgorithms",
    "fetchJSON",
]

_log = Logger()

#: The signature algorithms a JWKS can check: public keys only.
ALLOWED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

#: What identity providers sign with (Entra ID, Google, Keycloak, Okta: RS256).
DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")

#: A JWKS or an introspection answer is small; a bigger body is refused unread.
MAX_BODY = 1 << 20

#: Clock skew allowed between here and the identity provider, in seconds.
LEEWAY = 60


def checkAlgorithms(names: tuple[str, ...]) -> None:
    """ValueError unless every name is an asymmetric JWS algorithm (never C{none}, C{HS*})."""
    if not names:
        raise ValueError("at least one algorithm is needed")
    for name in names:
        if name not in ALLOWED_ALGORITHMS:
            raise ValueError(f"{name!r} is not allowed (allowed: {', '.join(ALLOWED_ALGORITHMS)})")


class InvalidToken(Exception):
    """The token names no one: bad signature, expired, for another audience, inactive..."""


class ITokenValidator(Interface):
    """Who a bearer token names."""

    def validate(token: str) -> Deferred[str]:
        """
        The user the token names; fails with L{InvalidToken}, or with
        L{TemporaryFailure} when the identity provider cannot be reached.
        """


# -- HTTP ---------------------------------------------------------------------------------


class _BoundedBody(Protocol):
    """Collects a response body of at most L{MAX_BODY} bytes."""

    def __init__(self, finished: Deferred[bytes]) -> None:
        self._finished = finished
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_BODY:
            self.transport.stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._size > MAX_BODY:
            self._finished.errback(ValueError(f"response over {MAX_BODY} bytes"))
        elif reason.check(ResponseDone):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(reason)


class HTTPClient:
    """
    JSON over HTTP(S) with Twisted's C{Agent}: certificates verified against
    the system's CAs, every request bounded by C{timeout} seconds.
    """

    def __init__(self, reactor: Any, timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._agent = Agent(reactor, connectTimeout=timeout)
        self.timeout = timeout

    def request(
        self, method: bytes, url: str, body: bytes | None = None, headers: dict | None = None
    ) -> Deferred[Any]:
        """The JSON object the URL answers with (status 200); fails with TemporaryFailure."""
        allHeaders = Headers({b"Accept": [b"application/json"]})
        for name, value in (headers or {}).items():
            allHeaders.setRawHeaders(name, [value])
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        d = self._agent.request(method, url.encode("ascii"), allHeaders, producer)
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self._reactor)
        d.addCallback(json.loads)
        d.addErrback(self._unavailable, url)
        return d

    def _read(self, response: Any) -> Deferred[bytes]:
        if response.code != 200:
            response.deliverBody(_BoundedBody(Deferred()))  # read and dropped
            raise ValueError(f"HTTP status {response.code}")
        finished: Deferred[bytes] = Deferred()
        response.deliverBody(_BoundedBody(finished))
        return finished

    def _unavailable(self, failure: Failure, url: str) -> Failure:
        _log.warn(
            "oauth: {url} cannot be used: {why}",
            url=url,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        raise TemporaryFailure()


def fetchJSON(
    url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10.0
) -> Any:
    """
    Blocking, for C{popserv check-config} only (never on the reactor): the
    JSON the URL answers with; ValueError says why not (no body, no secret).
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    request.add_header("Accept", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name.decode("ascii"), value.decode("ascii"))
    # No proxy from the environment: the server's Agent uses none either.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            data = response.read(MAX_BODY + 1)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: HTTP status {e.code}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{url}: cannot be reached: {getattr(e, 'reason', None) or e}") from None
    if len(data) > MAX_BODY:
        raise ValueError(f"{url}: response over {MAX_BODY} bytes")
    try:
        return json.loads(data)
    except ValueError:
        raise ValueError(f"{url}: the answer is not JSON") from None


# -- JWTs checked against a JWKS ----------------------------------------------------------


def _userFrom(claims: dict[str, Any], claim: str) -> str:
    user = claims.get(claim)
    if not isinstance(user, str) or not user:
        raise InvalidToken(f"no {claim!r} claim")
    return user


class JWKSValidator(Service):
    """
    JWTs signed by a key of the JWKS at C{url}.

    The keys are fetched when the service starts and every C{refresh}
    seconds, and kept: a token signed by a known key is checked while the
    identity provider is down. A token naming a key not yet seen fetches the
    JWKS again (a key rotation), at most once in C{refetchAfter} seconds.
    With no keys at all (never fetched, or the fetch failed), a login is a
    L{TemporaryFailure}.

    @ivar keys: the usable keys by C{kid} (C{""} for a key without one), each
        with the algorithm its JWK declares (C{alg}), if any.
    """

    refresh = 900.0
    refetchAfter = 30.0
    #: Seconds between two fetches a login starts while there is no JWKS.
    retryAfter = 1.0

    def __init__(
        self,
        reactor: Any,
        url: str,
        issuer: str,
        audience: str,
        userClaim: str = "email",
        algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
        http: HTTPClient | None = None,
    ) -> None:
        checkAlgorithms(algorithms)
        self._reactor = reactor
        self.url = url
        self.issuer = issuer
        self.audience = audience
        self.userClaim = userClaim
        self.algorithms = tuple(algorithms)
        self._http = http or HTTPClient(reactor)
        self.keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}
        self._fetching: Deferred[None] | None = None
        self._lastRefetch: float | None = None
        self._lastRetry: float | None = None
        self._timer: LoopingCall | None = None

    # -- the key set -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timer = LoopingCall(self._scheduled)
        self._timer.clock = self._reactor
        self._timer.start(self.refresh, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.running:
            self._timer.stop()

    def _scheduled(self) -> None:
        self.fetch().addErrback(lambda _: None)  # logged by the HTTP client

    def fetch(self) -> Deferred[None]:
        """Fetch the JWKS now (joining a fetch under way); fails with L{TemporaryFailure}."""
        if self._fetching is None:
            self._fetching = self._http.request(b"GET", self.url)
            self._fetching.addCallback(self.setKeys)
            self._fetching.addBoth(self._fetched)
        waiter: Deferred[None] = Deferred()
        self._fetching.addBoth(_relay, waiter)
        return waiter

    def _fetched(self, result: Any) -> Any:
        self._fetching = None
        return result

    def setKeys(self, jwks: Any) -> None:
        """Use the keys of a JWKS (a parsed JSON object); unusable keys are skipped."""
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            _log.warn("oauth: {url} is not a JWKS", url=self.url)
            raise TemporaryFailure()
        keys = {}
        for entry in jwks["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type or curve PyJWT cannot use
            keys[entry.get("kid") or ""] = (key, entry.get("alg"))
        self.keys = keys

    def status(self, timeout: float = 10.0) -> str:
        """
        Blocking, for C{popserv check-config}: fetch the JWKS once; ValueError
        if it cannot be fetched or holds no key usable for the algorithms.
        """
        jwks = fetchJSON(self.url, timeout=timeout)
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ValueError(f"{self.url}: not a JWKS")
        usable = 0
        for entry in jwks["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("alg") and entry["alg"] not in self.algorithms:
                continue
            try:
                jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue
            usable += 1
        if not usable:
            raise ValueError(f"{self.url}: no signing key for {', '.join(self.algorithms)}")
        return f"{self.url}: reachable, {usable} signing key{'s' if usable > 1 else ''}"

    # -- tokens ----------------------------------------------------------------

    def validate(self, token: str) -> Deferred[str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return fail(InvalidToken("not a JWT"))
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            return fail(InvalidToken(f"algorithm {algorithm!r} is not allowed"))
        kid = header.get("kid") or ""
        if not isinstance(kid, str):
            return fail(InvalidToken("bad kid"))
        if self._key(kid) is not None:
            return self._decode(token, kid, algorithm)
        if not self._mayRefetch():
            if not self.keys:  # no JWKS yet: the identity provider is down, not the token
                return fail(TemporaryFailure())
            return fail(InvalidToken(f"unknown key {kid!r}"))
        d = self.fetch()
        d.addCallback(lambda _: self._decode(token, kid, algorithm))
        return d

    def _key(self, kid: str) -> tuple[jwt.PyJWK, str | None] | None:
        key = self.keys.get(kid)
        if key is None and not kid and len(self.keys) == 1:
            key = next(iter(self.keys.values()))  # a JWKS of one key, a token naming none
        return key

    def _mayRefetch(self) -> bool:
        """A fetch now, for a key not known: at most one in C{refetchAfter}
        seconds, or in C{retryAfter} while there is no JWKS at all (the
        identity provider down since the start), so tokens cannot make a
        flood of fetches."""
        now = self._reactor.seconds()
        if not self.keys:
            if self._lastRetry is not None and now - self._lastRetry < self.retryAfter:
                return False
            self._lastRetry = now
            return True
        if self._lastRefetch is not None and now - self._lastRefetch < self.refetchAfter:
            return False
        self._lastRefetch = now
        return True

    def _decode(self, token: str, kid: str, algorithm: str) -> Deferred[str]:
        found = self._key(kid)
        if found is None:
            return fail(InvalidToken(f"unknown key {kid!r}"))
        key, declared = found
        if declared and declared != algorithm:
            return fail(InvalidToken(f"key {kid!r} is for {declared}, not {algorithm}"))
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
            return succeed(_userFrom(claims, self.userClaim))
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            return fail(InvalidToken(type(e).__name__))
        except InvalidToken as e:
            return fail(e)


def _relay(result: Any, waiter: Deferred[Any]) -> Any:
    """Pass a shared Deferred's result on to one waiter, keeping it for the others."""
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)
    return result


# -- RFC 7662 token introspection ---------------------------------------------------------


class IntrospectionValidator(Service):
    """
    Tokens the identity provider's RFC 7662 introspection endpoint says are
    active. The client authenticates with HTTP Basic (RFC 6749 section
    2.3.1). Where the answer holds them, C{exp}, C{iss} and C{aud} are
    checked against the configuration too.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        clientId: str,
        clientSecret: str,
        userClaim: str = "email",
        issuer: str | None = None,
        audience: str | None = None,
        http: HTTPClient | None = None,
    ) -> None:
        self.url = url
        self.userClaim = userClaim
        self.issuer = issuer
        self.audience = audience
        self._http = http or HTTPClient(reactor)
        pair = f"{quote(clientId, safe='')}:{quote(clientSecret, safe='')}"
        self._authorization = b"Basic " + base64.b64encode(pair.encode("utf-8"))

    def __repr__(self) -> str:
        return f"<IntrospectionValidator {self.url}>"  # never the client secret

    def validate(self, token: str) -> Deferred[str]:
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        d = self._http.request(
            b"POST",
            self.url,
            body,
            {
                b"Content-Type": b"application/x-www-form-urlencoded",
                b"Authorization": self._authorization,
            },
        )
        d.addCallback(self._verdict)
        return d

    def status(self, timeout: float = 10.0) -> str:
        """
        Blocking, for C{popserv check-config}: introspect a made-up token once;
        ValueError unless the endpoint answers (an inactive token) and takes
        the client credentials.
        """
        body = urlencode({"token": "popserv-check-config", "token_type_hint": "access_token"})
        headers = {
            b"Content-Type": b"application/x-www-form-urlencoded",
            b"Authorization": self._authorization,
        }
        answer = fetchJSON(self.url, body.encode("ascii"), headers, timeout)
        if not isinstance(answer, dict) or "active" not in answer:
            raise ValueError(f"{self.url}: not an RFC 7662 introspection answer")
        return f"{self.url}: reachable, client credentials accepted"

    def _verdict(self, answer: Any) -> str:
        if not isinstance(answer, dict):
            _log.warn("oauth: {url} answered no JSON object", url=self.url)
            raise TemporaryFailure()
        if answer.get("active") is not True:
            raise InvalidToken("inactive")
        expires = answer.get("exp")
        if isinstance(expires, int | float) and expires + LEEWAY < time.time():
            raise InvalidToken("expired")
        if self.issuer and answer.get("iss", self.issuer) != self.issuer:
            raise InvalidToken("issuer")
        if self.audience and "aud" in answer:
            audiences = answer["aud"] if isinstance(answer["aud"], list) else [answer["aud"]]
            if self.audience not in audiences:
                raise InvalidToken("audience")
        return _userFrom(answer, self.userClaim)
