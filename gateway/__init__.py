"""edge-gateway: prepaid metering gateway for remote transformer areas."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The installed distribution's version: a release is what its wheel says.
    __version__ = version("edge-gateway")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+source"
