"""Single DES for the retail MAC, from the system's OpenSSL library when it has it.

The retail MAC (ISO/IEC 9797-1 MAC algorithm 3) chains its blocks with single DES. ``cryptography``
offers DES only as TDES, so with it single DES runs as TDES with the key three times (EDE with one
key collapses to E): three times the cipher work, and the cipher work is most of a retail MAC's
cost. OpenSSL's libcrypto still exports its classic single-DES functions (``DES_ncbc_encrypt``,
``DES_ede3_cbc_encrypt``), which need no legacy provider; this module reaches them through
``ctypes``, two calls per MAC. Where the library or the functions are missing (another platform, a
build without deprecated APIs), ``load()`` gives None and the MAC runs on ``cryptography`` as
before. The two paths are kept equal by tests (published vectors, and a property comparing them on
random keys and data).

Buffers are this module's own and sized before each call: a call never reads or writes past what
it was given. A ``NativeRetail`` serves one thread at a time, like the key objects in mac.py (two
threads at once may get wrong MACs, never a write out of bounds: a buffer and its size are read
together).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any, Final

DES_BLOCK: Final = 8
_SCHEDULE_BYTES: Final = 128  # DES_key_schedule: 16 rounds x 8 bytes
_ENCRYPT: Final = 1
_ZERO: Final = bytes(DES_BLOCK)
# Set to "0" to keep the retail MAC on ``cryptography`` (a diagnosis; the results are the same).
ENV_SWITCH: Final = "ISO_GATEWAY_NATIVE_DES"


class _Lib:
    """The three functions, called without ``argtypes``: every argument is passed as the exact C
    type it must be (a ``c_long`` length, ``byref`` pointers to this module's buffers, ``bytes``
    for const input), which saves half of each call's cost. So each call site must keep to
    the C signature written beside it."""

    __slots__ = ("ncbc", "ede3_cbc", "set_key")

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.ncbc = lib.DES_ncbc_encrypt  # (const uchar *in, uchar *out, long length, DES_key_schedule *, DES_cblock *ivec, int enc)
        self.ncbc.restype = None
        self.ede3_cbc = lib.DES_ede3_cbc_encrypt  # (in, out, long length, ks1, ks2, ks3, DES_cblock *ivec, int enc)
        self.ede3_cbc.restype = None
        self.set_key = lib.DES_set_key_unchecked  # (const_DES_cblock *key, DES_key_schedule *schedule)
        self.set_key.restype = None


_loaded: _Lib | None | bool = False


def load() -> _Lib | None:
    """OpenSSL's single-DES functions, or None when this system's libcrypto lacks them (or
    ``ISO_GATEWAY_NATIVE_DES=0``). Looked up once."""
    global _loaded
    if _loaded is False:
        _loaded = None
        if os.environ.get(ENV_SWITCH, "1") != "0":
            for name in (ctypes.util.find_library("crypto"), "libcrypto.so.3"):
                if not name:
                    continue
                try:
                    _loaded = _Lib(ctypes.CDLL(name))
                except (OSError, AttributeError):  # no such library, or built without these functions
                    continue
                break
    return _loaded  # type: ignore[return-value]


class NativeRetail:
    """The retail MAC of one double-length key K1 || K2 on OpenSSL's single DES: ``mac(data)`` pads
    ``data`` (ISO/IEC 9797-1 method 1 or 2), chains it under K1 (zero IV), then decrypts the last
    chaining value under K2 and encrypts it under K1."""

    __slots__ = ("_lib", "_ks1", "_ks2", "_iv", "_refs", "_method2")

    def __init__(self, lib: _Lib, k1: bytes, k2: bytes, padding: int = 1) -> None:
        if len(k1) != DES_BLOCK or len(k2) != DES_BLOCK:
            raise ValueError("two 8-byte DES keys")
        if padding not in (1, 2):
            raise ValueError("padding method 1 or 2")
        self._lib = lib
        self._method2 = padding == 2
        self._ks1 = ctypes.create_string_buffer(_SCHEDULE_BYTES)
        self._ks2 = ctypes.create_string_buffer(_SCHEDULE_BYTES)
        lib.set_key(bytes(k1), ctypes.byref(self._ks1))
        lib.set_key(bytes(k2), ctypes.byref(self._ks2))
        self._iv = bytearray(DES_BLOCK)  # the chaining value, read back as the MAC
        self._refs: tuple[Any, ...] = ()
        self._grow(1024)  # the ciphertext, thrown away; grown as needed

    def _grow(self, room: int) -> tuple[Any, ...]:
        """New references for the calls, with an output buffer of ``room`` bytes. One tuple, set in
        one assignment: a call reads the buffer and its size together, never one without the other."""
        out = ctypes.create_string_buffer(room)
        iv = (ctypes.c_char * DES_BLOCK).from_buffer(self._iv)
        refs = self._refs = (ctypes.byref(out), ctypes.byref(self._ks1), ctypes.byref(self._ks2), ctypes.byref(iv),
                             ctypes.c_int(_ENCRYPT), room, out, iv)
        return refs

    def mac(self, data: bytes) -> bytes:
        """The 8-byte MAC of ``data`` (``bytes``)."""
        if type(data) is not bytes:
            raise ValueError("the data to MAC must be bytes")
        if self._method2:
            data += b"\x80"
        n = len(data)
        if not n:
            data, n = _ZERO, DES_BLOCK  # method 1 pads empty data to one block of zeros
        # Every block but the last goes through DES_ncbc_encrypt; the last (1 to 8 bytes) through
        # DES_ede3_cbc_encrypt. Both read exactly ``length`` bytes and take a short last block as
        # zero-padded: padding method 1, with no padded copy of the data.
        head = (n - 1) & ~(DES_BLOCK - 1)
        refs = self._refs
        if head > refs[5]:
            refs = self._grow(head)
        out, ks1, ks2, iv, encrypt = refs[:5]
        self._iv[:] = _ZERO
        if head:
            # DES_ncbc_encrypt(in, out, long length, schedule, ivec, enc): ``head`` bytes read from
            # ``data``, as many written to ``out`` (room checked above); the chaining value left in ivec.
            self._lib.ncbc(data, out, ctypes.c_long(head), ks1, iv, encrypt)
        # The last block under K1, K2, K1 (EDE) with the chain so far as its IV: E_K1(D_K2(E_K1(x))),
        # x the last block xor the chain: the last chaining value, then the output transformation.
        # DES_ede3_cbc_encrypt(in, out, long length, ks1, ks2, ks3, ivec, enc) leaves its output in ivec.
        self._lib.ede3_cbc(data[head:], out, ctypes.c_long(n - head), ks1, ks2, ks1, iv, encrypt)
        return bytes(self._iv)

    def __repr__(self) -> str:
        return "NativeRetail()"
