"""URLs to include in a project's urls.py: ``path("", include("dwebsocket.urls"))`` serves ``/metrics``.

Or route the view yourself: ``path("metrics", dwebsocket.metrics.view)``.
See docs/metrics.md.
"""

from __future__ import annotations

from django.urls import path

from . import metrics

__all__ = ["urlpatterns"]

urlpatterns = [
    path("metrics", metrics.view, name="dwebsocket-metrics"),
]
