from django.urls import include, path

from controlplane.api import api
from controlplane.health import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("api/v1/", api.urls),
    path("", include("tenants.urls")),
]

handler400 = "controlplane.views.bad_request"
handler403 = "controlplane.views.permission_denied"
handler404 = "controlplane.views.page_not_found"
handler500 = "controlplane.views.server_error"
