"""
popserv as a tac file, built through the public API:

    twistd -ny etc/popserv.tac

It serves the demo configuration next to it; point CONFIG elsewhere (or build
a Config in Python) for a real installation.
"""

import os

from twisted.application.service import Application

import popserv

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "popserv.conf")

application = Application("popserv")
popserv.makeService(popserv.loadConfig(CONFIG)).setServiceParent(application)
