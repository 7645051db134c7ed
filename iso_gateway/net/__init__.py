"""The network shell: the poller, front-end connections, upstream links, frame writers and the
HTTP endpoint. It moves bytes and waits; what a message means is decided by the core and the
application above it, which this package reaches only through Protocols of its own
(``frontend.FrontHandler``, ``links.LinkHost``), never by importing it.
"""
