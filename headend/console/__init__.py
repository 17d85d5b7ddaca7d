"""The operator console: server-rendered pages of the fleet, behind login with roles.

:func:`headend.console.app.mount_console` adds it to an aiohttp application;
``edgegw headend console`` serves it on its own; ``edgegw headend user``
manages its users. docs/console.md describes the pages and the roles.
"""
