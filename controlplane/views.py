"""Friendly error pages for the dashboard (the API has its JSON envelope in controlplane.api)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(
        request,
        "errors/error.html",
        {"title": "Bad request", "message": "The request could not be understood."},
        status=400,
    )


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    message = (
        str(exception) if exception and str(exception) else "You do not have access to this page."
    )
    return render(
        request, "errors/error.html", {"title": "Not allowed", "message": message}, status=403
    )


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(
        request,
        "errors/error.html",
        {
            "title": "Not found",
            "message": "There is nothing here, or you do not have access to it.",
        },
        status=404,
    )


def server_error(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "errors/error.html",
        {
            "title": "Something went wrong",
            "message": "The error is logged. Please try again in a moment.",
        },
        status=500,
    )
