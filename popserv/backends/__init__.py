"""Storage backends: each provides L{popserv.interfaces.IMailStore}."""
