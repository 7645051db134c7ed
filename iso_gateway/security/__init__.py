"""Cryptography for card data: protecting PANs at rest, key check values.

Everything here uses the ``cryptography`` package; nothing here touches a socket.
"""
