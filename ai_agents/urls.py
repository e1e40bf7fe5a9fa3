"""Dashboard routes of the agents app, mounted under /t/<tenant_slug>/."""

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
