"""The C{ldap:} auth-source kind: users in an LDAP directory, an RFC 4516 URL after the colon."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from popserv.registry import IAuthSourceKind, SourceContext
from popserv.settings import BOOL, STR, Setting


@implementer(IPlugin, IAuthSourceKind)
class LdapPassdbKind:
    """Users in an LDAP directory (OpenLDAP, Active Directory), bound as or looked up."""

    name = "ldap"
    description = (
        "users in an LDAP directory, e.g. "
        "ldap:ldaps://ldap.example.org/ou=people,dc=example,dc=org??sub?(uid=%u)"
    )
    options = (
        Setting(
            "auth_bind",
            BOOL,
            True,
            "Check a password by binding as the user's entry; no: read its userPassword "
            "({SSHA}, {SSHA512}, {CRYPT}, {ARGON2}...) as the bind DN and check it here.",
        ),
        Setting(
            "bind_dn",
            STR,
            None,
            "The DN the user searches bind as; without one they are anonymous.",
            defaultText="anonymous searches",
            metavar="DN",
        ),
        Setting(
            "bind_password_file",
            STR,
            None,
            "A file whose first line is the bind DN's password (never the password itself "
            "on a command line).",
            metavar="FILE",
        ),
        Setting(
            "ca",
            STR,
            None,
            "CA certificates (PEM) that verify the directory's certificate for ldaps:// and "
            "StartTLS.",
            defaultText="the system's CA certificates",
            metavar="FILE",
        ),
    )

    def check(self, args: str, baseDir: str) -> None:
        from popserv.auth.ldapurl import parseLdapURL

        if not args:
            raise ValueError(
                "ldap: needs an LDAP URL, e.g. ldap:ldap://host/ou=people,dc=example,dc=org"
            )
        parseLdapURL(args)

    def makeSource(self, args: str, context: SourceContext) -> Any:
        from popserv.auth.ldap import LdapPassdb
        from popserv.auth.ldapurl import parseLdapURL

        options = context.options
        url = parseLdapURL(args)
        authBind = options.get("auth_bind", True)
        bindDN = options.get("bind_dn") or None
        password = None
        passwordFile = options.get("bind_password_file")
        if passwordFile:
            with open(os.path.join(context.baseDir, os.path.expanduser(passwordFile))) as f:
                password = f.readline().rstrip("\r\n")
        elif bindDN is not None:
            raise ValueError("ldap_bind_dn needs ldap_bind_password_file")
        if not authBind and "password" not in url.attributes.values():
            url = replace(url, attributes={"userPassword": "password", **url.attributes})
        ca = options.get("ca")
        return LdapPassdb(
            url,
            authBind=authBind,
            bindDN=bindDN,
            bindPassword=password,
            caFile=os.path.join(context.baseDir, os.path.expanduser(ca)) if ca else None,
            reactor=context.reactor,
            masterUsers=context.masterUsers,
            cache=context.cache,
            saltKey=context.saltKey,
        )


ldapPassdb = LdapPassdbKind()
