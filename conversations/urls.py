"""Routes of the end-user chat, mounted under /t/<tenant_slug>/."""

from django.urls import path

from conversations import inspector_views, views

urlpatterns = [
    path("chat/", views.chat_home, name="chat-home"),
    path("chat/start/", views.chat_start, name="chat-start"),
    path("chat/<uuid:thread_id>/", views.chat_thread, name="chat-thread"),
    path("chat/<uuid:thread_id>/items/", views.chat_items, name="chat-items"),
    path("chat/<uuid:thread_id>/send/", views.chat_send, name="chat-send"),
    path("chat/<uuid:thread_id>/rename/", views.chat_rename, name="chat-rename"),
    path("chat/<uuid:thread_id>/delete/", views.chat_delete, name="chat-delete"),
    # The run inspector (owners and admins).
    path("runs/", inspector_views.run_list, name="run-list"),
    path("runs/<uuid:run_id>/", inspector_views.run_detail, name="run-detail"),
    path("runs/playground/", inspector_views.playground_run_list, name="playground-run-list"),
    path(
        "runs/playground/<uuid:run_id>/",
        inspector_views.playground_run_detail,
        name="playground-run-detail",
    ),
    path("runs/<uuid:run_id>/cancel/", inspector_views.run_cancel, name="run-cancel"),
    path(
        "runs/threads/<uuid:thread_id>/",
        inspector_views.thread_transcript,
        name="thread-transcript",
    ),
]
