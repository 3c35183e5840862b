"""dwebsocket's template tag libraries: ``{% load dwebsocket %}``."""
