"""
What a configuration names, built by the plugins of its kinds: the mail
store (C{mail_location}) and the checker of its auth sources (C{passwd},
C{passdb}). The server (L{popserv.service}) and the admin commands (such as
C{popserv deliver}, which needs the store alone) both build them here.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker

from popserv.config import Config, ConfigError
from popserv.interfaces import IMailStore
from popserv.registry import SourceContext, StoreContext, authSourceKind, storeKind

__all__ = ["makeStore", "makeChecker", "makeTokenValidator"]


def makeStore(config: Config, runInThread: Any, createMissing: bool | None = None) -> IMailStore:
    """
    The mail store of C{config}'s mail location, made by its kind's plugin.

    @param createMissing: whether a missing maildrop is made at first use
        (default: as C{create_maildirs} says; a delivery always makes it).
    """
    kind, args = config.store
    try:
        plugin = storeKind(kind)
        context = StoreContext(
            config.base_dir,
            runInThread,
            config.pluginOptions(plugin),
            createMissing=config.create_maildirs if createMissing is None else createMissing,
            uidlSource=config.uidl_source,
        )
        return plugin.makeStore(args, context)
    except (OSError, ValueError) as e:
        raise ConfigError(f"mail_location: {e}") from None


def makeChecker(
    config: Config, reactor: Any, runInThread: Any, saltKey: Any = None
) -> ICredentialsChecker:
    """
    The checker of C{config}'s auth sources, each made by its kind's plugin;
    several are asked in turn (L{popserv.auth.chain.PassdbChain}), with
    login names in the canonical form of the user-name rules.
    """
    from popserv.auth.cache import VerificationCache
    from popserv.auth.chain import chainSources

    cache = VerificationCache(reactor, ttl=config.auth_cache_ttl)
    sources = []
    for spec in config.authSources:
        try:
            plugin = authSourceKind(spec.kind)
            context = SourceContext(
                config.base_dir,
                runInThread,
                reactor,
                config.pluginOptions(plugin, spec.options),
                masterUsers=frozenset(config.master_users),
                cache=cache,
                saltKey=saltKey,
            )
            sources.append(plugin.makeSource(spec.args, context))
        except OSError as e:
            raise ConfigError(f"passdb {spec}: cannot read {spec.args}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"passdb {spec}: {e}") from None
    checker = chainSources(sources, clock=reactor)
    rules = config.usernameRules
    if rules.identity:
        return checker
    from popserv.auth.usernames import NameRulesChecker

    return NameRulesChecker(checker, rules)


def makeTokenValidator(config: Config, reactor: Any) -> Any:
    """
    What checks OAuth 2.0 bearer tokens (L{popserv.auth.oauth}): a JWKS, an
    introspection endpoint, or None when neither is configured. It is a
    service: started, it fetches the JWKS and keeps it fresh.
    """
    if not config.oauth_jwks and not config.oauth_introspection:
        return None
    from popserv.auth.oauth import IntrospectionValidator, JWKSValidator

    if config.oauth_jwks:
        assert config.oauth_issuer and config.oauth_audience
        return JWKSValidator(
            reactor,
            config.oauth_jwks,
            config.oauth_issuer,
            config.oauth_audience,
            config.oauth_user_claim,
            config.oauth_algorithms,
        )
    secretFile = config.path(config.oauth_client_secret_file)
    assert config.oauth_introspection and config.oauth_client_id and secretFile
    try:
        with open(secretFile, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"oauth_client_secret_file: cannot read it: {e.strerror}") from None
    if not secret:
        raise ConfigError("oauth_client_secret_file: the file is empty")
    return IntrospectionValidator(
        reactor,
        config.oauth_introspection,
        config.oauth_client_id,
        secret,
        config.oauth_user_claim,
        issuer=config.oauth_issuer,
        audience=config.oauth_audience,
    )
