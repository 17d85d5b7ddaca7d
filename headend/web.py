"""The headend's web side: one aiohttp application, served over HTTP or HTTPS.

:func:`build_app` puts together what this headend serves, each part when
asked for:

* central's command and payment API under ``/api/v1`` (:mod:`headend.api`)
  when given the central service (:class:`headend.central.Central`, kept
  under :data:`CENTRAL`): commands, payments, reports, each request
  authenticated by a per-role token of central's (docs/central.md);
* the read-only JSON API for integrators under ``/api/v1``
  (:mod:`headend.read_api`, its own read tokens; docs/integration.md) — its
  paths and central's do not overlap;
* the operator console under ``/console/`` (:mod:`headend.console`), to
  which ``/`` leads;
* whatever each of ``mounts`` adds: callables that receive the application
  before it starts and add routes, sub-applications or start-up hooks.

Each part authenticates its own routes. :func:`serve` starts the application
on an address and returns its runner (``await runner.cleanup()`` stops it)
and the port.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import web

from headend import api
from headend.central import Central

if TYPE_CHECKING:
    from headend.console.app import ConsoleSettings
    from headend.read_api import ReadApiSettings

CONSOLE_PREFIX = "/console"
CENTRAL = api.CENTRAL
MAX_REQUEST_BYTES = 1 << 20

Mount = Callable[[web.Application], None]


def build_app(
    central: Central | None = None,
    *,
    console: ConsoleSettings | None = None,
    read_api: ReadApiSettings | None = None,
    mounts: Iterable[Mount] = (),
) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    if central is not None:
        app[CENTRAL] = central
        api.add_routes(app)
    if read_api is not None:
        from headend.read_api import mount_read_api

        mount_read_api(app, read_api)
    if console is not None:
        from headend.console.app import mount_console

        mount_console(app, console, CONSOLE_PREFIX)

        async def root(request: web.Request) -> web.StreamResponse:
            return web.Response(status=303, headers={"Location": CONSOLE_PREFIX + "/"})

        app.router.add_get("/", root)
    for mount in mounts:
        mount(app)
    return app


async def serve(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: any free port); the runner and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    return runner, bound


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) from a certificate chain and its key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
