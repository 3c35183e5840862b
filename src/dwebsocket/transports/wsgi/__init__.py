"""The WSGI transport: a socket borrowed from the WSGI server, driven with wsproto."""

__all__: list[str] = []
