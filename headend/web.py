"""The headend's web side: one aiohttp application, served over HTTP or HTTPS.

:func:`build_app` puts together what this headend serves: the operator
console under ``/console/`` (:mod:`headend.console`), to which ``/`` leads,
and the read-only JSON API for integrators under ``/api/v1``
(:mod:`headend.read_api`), each when asked for. :func:`serve` starts the application on an address and returns
its runner (``await runner.cleanup()`` stops it).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from headend.console.app import ConsoleSettings
    from headend.read_api import ReadApiSettings

CONSOLE_PREFIX = "/console"


def build_app(
    *, console: ConsoleSettings | None = None, read_api: ReadApiSettings | None = None
) -> web.Application:
    app = web.Application()
    if read_api is not None:
        from headend.read_api import mount_read_api

        mount_read_api(app, read_api)
    if console is not None:
        from headend.console.app import mount_console

        mount_console(app, console, CONSOLE_PREFIX)

        async def root(request: web.Request) -> web.StreamResponse:
            return web.Response(status=303, headers={"Location": CONSOLE_PREFIX + "/"})

        app.router.add_get("/", root)
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
