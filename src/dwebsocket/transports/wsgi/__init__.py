"""The WSGI transport: a socket borrowed from the WSGI server, driven with websockets' sans-I/O protocol."""

__all__: list[str] = []
