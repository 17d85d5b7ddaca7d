"""The command path: signed commands from central, verified and applied exactly once.

* :mod:`gateway.commands.bodies` — the body of every command type: one parser
  each, in one registry (also used by the envelope check before the signature);
* :mod:`gateway.commands.handler` — :class:`~gateway.commands.handler.CommandHandler`:
  verify, apply through the ports, audit and report, in one transaction;
* :mod:`gateway.commands.tally` — the flood limits on rejections (pure);
* :mod:`gateway.commands.inbox` — commands from the uplink's MQTT connection.

The package imports none of its modules (the envelope check imports the
bodies alone, and the handler imports the envelope check).
"""
