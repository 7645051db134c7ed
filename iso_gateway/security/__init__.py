"""Keys and what is done with them: MACs, key check values, working keys, card data at rest.

- ``mac``: ISO/IEC 9797-1 MAC algorithm 3 (retail MAC) and AES-CMAC, key check values; pure functions.
- ``module``: the SecurityModule interface every key operation goes through, its errors, the sealed
  record format.
- ``software``: the implementation over a key file wrapped under a key-encrypting key.
- ``pkcs11``: the implementation over a PKCS#11 token (python-pkcs11; SoftHSM2 in the tests).
- ``keys``: key values in memory and the pure operations both implementations share.
- ``pan``: the journal's PAN vault (sealed records with key ids, lookup hashes).

Everything here uses the ``cryptography`` package (and python-pkcs11 in ``pkcs11``); nothing here
touches a socket or reads the clock. See docs/security.md.
"""
