"""edge-gateway: prepaid metering gateway for remote transformer areas."""

__version__ = "0.1.0"
