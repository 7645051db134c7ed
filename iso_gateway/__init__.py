"""iso-gateway: an ISO 8583 message processor daemon (virtual POS to bank switch)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iso-gateway")  # written once, in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
