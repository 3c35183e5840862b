"""Template tag libraries: ``{% load dwebsocket %}``."""

__all__: list[str] = []
