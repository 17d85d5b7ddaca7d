"""Security: signed command envelopes, roles, trusted time, tamper-evident audit log.

* :mod:`gateway.security.roles` — central's signing roles, the command types
  each may sign, the trust store;
* :mod:`gateway.security.envelope` — the signed envelope: format,
  verification (:func:`~gateway.security.envelope.authenticate`,
  :func:`~gateway.security.envelope.decide`), replay state;
* :mod:`gateway.security.trusted_time` — the trusted clock;
* :mod:`gateway.security.audit` — the hash-chained audit log.

The pure cores take values and return values; the async helpers run on the
daemon's single writer connection inside the caller's transaction. See
docs/security.md for the threat model. The package imports none of its
modules: the envelope's body checks (:mod:`gateway.commands.bodies`) read the
command types from :mod:`gateway.security.roles`, and import it alone.
"""
