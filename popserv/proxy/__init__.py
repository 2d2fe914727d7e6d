"""
The POP3 proxy mode: route each user to a backend POP3 server, log in
there, and relay the session (compare Dovecot's proxy, nginx's mail proxy
and perdition).

  - L{popserv.proxy.fields}: the per-user routing fields (Dovecot's names);
  - L{popserv.proxy.realm}: the routing and the realm that wraps the server's own;
  - L{popserv.proxy.connect}: trying the backends of a list within the timeout;
  - L{popserv.proxy.client}: the login at a backend (STLS/TLS, SASL PLAIN, USER/PASS);
  - L{popserv.proxy.relay}: the byte relay with back-pressure both ways;
  - L{popserv.proxy.proxyv2}: the PROXY v2 header for the backend.
"""
