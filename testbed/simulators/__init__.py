"""Simulated meters: DL/T 645-2007 (:mod:`.dlt645`) and Modbus RTU/TCP (:mod:`.modbus`).

Each runs on its own too::

    python -m testbed.simulators.dlt645 --help
    python -m testbed.simulators.modbus --help
"""
