"""C{python -m popserv}: the administrator's command (see L{popserv.admin})."""

from popserv.admin import main

raise SystemExit(main())
