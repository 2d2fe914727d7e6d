"""
Authentication: credentials, password schemes, the passwd-file checker and the
realm that turns an authenticated user into a locked mailbox.

The protocol only ever calls C{Portal.login}; it never sees the password store.
"""

from popserv.auth.credentials import APOPCredentials, UsernamePassword
from popserv.auth.passwdfile import PasswdFileChecker
from popserv.auth.realm import MailboxRealm

__all__ = ["APOPCredentials", "UsernamePassword", "PasswdFileChecker", "MailboxRealm"]
