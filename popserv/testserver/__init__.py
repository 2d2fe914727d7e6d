"""
popserv as the POP3 server in other projects' tests.

  - L{popserv.testserver.client}: L{POP3TestServer}, a real popserv in a
    subprocess with a control channel (standard library only);
  - L{popserv.testserver.plugin}: the pytest plugin (entry point
    C{pytest11}): the C{pop3_server} and C{pop3_server_session} fixtures;
  - L{popserv.testserver.server}: the subprocess: the server and its
    control channel;
  - L{popserv.testserver.faults}: the transcript and the injected faults,
    a layer over the production protocol;
  - L{popserv.testserver.certs}: a throw-away CA and server certificate.
"""

from popserv.testserver.client import POP3TestServer, TestServerError

__all__ = ["POP3TestServer", "TestServerError"]
