"""iso-gateway: an ISO 8583 message processor daemon (virtual POS to bank switch)."""

__version__ = "0.1.0"
