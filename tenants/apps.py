from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants, members and access"

    def ready(self) -> None:
        from tenants import signals  # noqa: F401
