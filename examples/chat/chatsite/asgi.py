"""ASGI config for chatsite, as ``startproject`` writes it.

With 'dwebsocket' in INSTALLED_APPS, Django's own get_asgi_application()
serves the WebSocket views too: nothing here changes.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

application = get_asgi_application()
