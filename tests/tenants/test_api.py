import json
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from tenants import services
from tenants.models import ApiKey


def test_both_header_forms_authenticate_through_the_same_path(world_a, api_client):
    for header in ("bearer", "x-api-key"):
        response = api_client(world_a.read_key_raw, header).get("/api/v1/tenant")
        assert response.status_code == 200, response.content
        assert response.json()["slug"] == "acme"
        assert "tenant_id" not in response.json()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "API key is required"),
        ({"HTTP_AUTHORIZATION": "Basic Zm9vOmJhcg=="}, "Bearer"),
        ({"HTTP_AUTHORIZATION": "Bearer "}, "Bearer"),
        ({"HTTP_AUTHORIZATION": "Bearer nonsense"}, "malformed"),
        ({"HTTP_X_API_KEY": "cp_00000000_" + "a" * 43}, "not valid"),
    ],
)
def test_missing_and_malformed_keys_get_a_clear_401(db, headers, message):
    response = Client(**headers).get("/api/v1/tenant")
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "unauthenticated" and message in body["message"]


def test_revoked_and_expired_keys_get_401_never_500(world_a, api_client):
    services.api_key_revoke(
        tenant=world_a.tenant, actor=world_a.actor(), api_key_id=world_a.read_key.pk
    )
    response = api_client(world_a.read_key_raw).get("/api/v1/tenant")
    assert (response.status_code, response.json()["message"]) == (
        401,
        "The API key has been revoked.",
    )
    ApiKey.objects.for_tenant(world_a.tenant).filter(pk=world_a.admin_key.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    response = api_client(world_a.admin_key_raw, "x-api-key").get("/api/v1/tenant")
    assert (response.status_code, response.json()["message"]) == (401, "The API key has expired.")


def test_two_different_keys_in_one_request_are_refused(world_a, world_b):
    client = Client(
        HTTP_AUTHORIZATION=f"Bearer {world_a.read_key_raw}", HTTP_X_API_KEY=world_b.read_key_raw
    )
    assert client.get("/api/v1/tenant").status_code == 401


def test_a_key_without_the_scope_gets_403_naming_it(world_a, api_client):
    response = api_client(world_a.read_key_raw).get("/api/v1/api-keys")
    assert response.status_code == 403
    assert response.json()["metadata"] == {"required_scope": "admin"}


def test_creating_a_key_returns_the_secret_once(world_a, api_client):
    client = api_client(world_a.admin_key_raw)
    response = client.post(
        "/api/v1/api-keys",
        {"name": "deploy", "scopes": ["read", "run"]},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    created = response.json()
    raw = created["key"]
    assert services.api_key_authenticate(raw=raw).name == "deploy"
    listed = client.get("/api/v1/api-keys").json()
    assert raw not in json.dumps(listed)
    assert all("key" not in k and "key_hash" not in k for k in listed)
    shown = client.get(f"/api/v1/api-keys/{created['id']}").json()
    assert shown["prefix"] == created["prefix"] and "key" not in shown


def test_revoking_by_api_takes_effect_at_once(world_a, api_client):
    client = api_client(world_a.admin_key_raw)
    response = client.post(f"/api/v1/api-keys/{world_a.read_key.pk}/revoke")
    assert response.json()["status"] == "revoked"
    assert api_client(world_a.read_key_raw).get("/api/v1/tenant").status_code == 401


def test_bad_bodies_get_4xx_naming_the_field(world_a, api_client, settings):
    client = api_client(world_a.admin_key_raw)
    response = client.post(
        "/api/v1/api-keys", {"name": "", "scopes": []}, content_type="application/json"
    )
    assert response.status_code == 422
    assert set(response.json()["metadata"]["fields"]) == {"name", "scopes"}

    response = client.post(
        "/api/v1/api-keys", {"name": "x", "scopes": ["root"]}, content_type="application/json"
    )
    assert response.status_code == 422
    assert "root" in response.json()["metadata"]["fields"]["scopes"]

    response = client.post("/api/v1/api-keys", "{not json", content_type="application/json")
    assert 400 <= response.status_code < 500 and response.status_code != 404

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = client.post(
        "/api/v1/api-keys",
        {"name": "x" * 2000, "scopes": ["read"]},
        content_type="application/json",
    )
    assert response.status_code == 413 and "1000 bytes" in response.json()["message"]
    assert ApiKey.objects.for_tenant(world_a.tenant).count() == 2  # nothing half-written


def test_another_tenants_ids_are_404(world_a, world_b, api_client):
    client = api_client(world_b.admin_key_raw)
    assert client.get(f"/api/v1/api-keys/{world_a.read_key.pk}").status_code == 404
    response = client.post(f"/api/v1/api-keys/{world_a.read_key.pk}/revoke")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert ApiKey.objects.for_tenant(world_a.tenant).get(pk=world_a.read_key.pk).revoked_at is None
    members = client.get("/api/v1/members").json()
    assert {m["email"] for m in members} == {
        "owner@globex.test",
        "admin@globex.test",
        "member@globex.test",
    }


def test_audit_events_are_filterable_and_paginated(
    world_a, api_client, django_assert_max_num_queries
):
    client = api_client(world_a.admin_key_raw)
    with django_assert_max_num_queries(6):
        body = client.get("/api/v1/audit-events?action=api_key.&limit=1").json()
    assert body["count"] == 2 and len(body["items"]) == 1
    assert body["items"][0]["action"] == "api_key.created"
    assert client.get("/api/v1/audit-events?since=yesterday").status_code == 422


def test_the_openapi_document_describes_the_key_header(db):
    schema = Client().get("/api/v1/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"]["scheme"] == "bearer"
    assert Client().get("/api/v1/docs").status_code == 200
