"""Routes of the end-user chat, mounted under /t/<tenant_slug>/."""

from django.urls import path

from conversations import views

urlpatterns = [
    path("chat/", views.chat_home, name="chat-home"),
    path("chat/start/", views.chat_start, name="chat-start"),
    path("chat/<uuid:thread_id>/", views.chat_thread, name="chat-thread"),
    path("chat/<uuid:thread_id>/items/", views.chat_items, name="chat-items"),
    path("chat/<uuid:thread_id>/rename/", views.chat_rename, name="chat-rename"),
    path("chat/<uuid:thread_id>/delete/", views.chat_delete, name="chat-delete"),
]
