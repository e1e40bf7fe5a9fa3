from django.urls import path

from usage import views

urlpatterns = [
    path("usage/", views.usage_page, name="usage"),
    path("usage/export.csv", views.usage_export, name="usage-export"),
    path("usage/prices/", views.price_list, name="price-list"),
    path("usage/prices/list-prices/", views.price_list_prices, name="price-list-prices"),
    path("usage/prices/<uuid:price_id>/", views.price_detail, name="price-detail"),
    path("usage/prices/<uuid:price_id>/delete/", views.price_delete, name="price-delete"),
    path("settings/budget/", views.budget_settings, name="budget-settings"),
]
