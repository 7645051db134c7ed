"""The sans-IO core: ISO 8583 dialects, framing, messages, scanning, masking, validation,
routing, matching, duplicates and reversal construction.

Everything here takes bytes and plain values (and ``now`` where time matters) and returns
values: no trio, no sockets, no files, no clock. tests/test_layers.py holds that line.
"""
