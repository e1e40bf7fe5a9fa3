"""Managing agents from code: the admin API, with keys write-only and references checked."""

import io
import json

from cryptography.fernet import Fernet
from django.core.management import call_command

from ai_agents import services
from ai_agents.models import McpServer, ModelProvider
from controlplane import crypto


def _post(client, url, body, method="post"):
    return getattr(client, method)(url, json.dumps(body), content_type="application/json")


def test_manage_an_agent_end_to_end_from_code(world_a, api_client, fake_llm):
    client = api_client(world_a.admin_key_raw)
    response = _post(
        client,
        "/api/v1/providers",
        {
            "name": "Fake",
            "base_url": fake_llm.base_url,
            "default_model": "fake-model",
            "api_key": "sk-fake-provider-key",
        },
    )
    assert response.status_code == 201, response.content
    provider = response.json()
    assert provider["has_api_key"] is True and provider["api_key_last4"] == "-key"
    assert "sk-fake-provider-key" not in response.content.decode()
    assert client.post(f"/api/v1/providers/{provider['id']}/test").json() == {
        "ok": True,
        "message": "Connected: fake-model answered.",
    }

    response = _post(
        client,
        "/api/v1/agents",
        {
            "name": "Calc",
            "config": {"provider_id": provider["id"], "tools": [{"name": "calculator"}]},
        },
    )
    assert response.status_code == 201, response.content
    agent = response.json()
    assert agent["status"] == "draft" and agent["published_version"] is None

    fake_llm.script(
        [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]},
            {"text": "Two."},
        ]
    )
    run = _post(client, f"/api/v1/agents/{agent['id']}/draft/run", {"input": "1+1?"}).json()
    assert run["status"] == "success" and run["output"] == "Two."
    assert run["version_number"] is None  # the draft ran
    assert [s["tool"] for s in run["trace"] if s["kind"] == "tool_call"] == ["calculator"]
    assert run["usage"]["requests"] == 2
    # the run is kept with its trace, for inspection later
    kept = client.get(f"/api/v1/agents/{agent['id']}/runs/{run['id']}").json()
    assert kept["trace"] == run["trace"] and kept["input"] == "1+1?"
    assert [r["id"] for r in client.get(f"/api/v1/agents/{agent['id']}/runs").json()] == [run["id"]]

    v1 = _post(client, f"/api/v1/agents/{agent['id']}/publish", {"note": "first"}).json()
    assert (v1["number"], v1["state"]) == (1, "published")
    draft = _post(
        client,
        f"/api/v1/agents/{agent['id']}/draft",
        {"provider_id": provider["id"], "instructions": "Be brief."},
        method="put",
    )
    assert draft.status_code == 200 and draft.json()["state"] == "draft"
    v2 = _post(client, f"/api/v1/agents/{agent['id']}/publish", {}).json()
    diff = client.get(f"/api/v1/agents/{agent['id']}/compare?a={v1['id']}&b={v2['id']}").json()
    assert {d["field"] for d in diff} == {"instructions", "tools"}
    restored = client.post(f"/api/v1/agents/{agent['id']}/versions/{v1['id']}/restore").json()
    assert restored["number"] == 3 and restored["config"] == v1["config"]
    assert client.get(f"/api/v1/agents/{agent['id']}").json()["published_version"] == 3
    versions = client.get(f"/api/v1/agents/{agent['id']}/versions").json()
    assert [v["number"] for v in versions] == [3, 2, 1]


def test_keys_and_headers_are_write_only(world_a, api_client):
    client = api_client(world_a.admin_key_raw)
    provider = _post(
        client,
        "/api/v1/providers",
        {
            "name": "P",
            "base_url": "https://llm.example.com/v1",
            "default_model": "m",
            "api_key": "sk-very-secret-0000-1234",
        },
    ).json()
    server = _post(
        client,
        "/api/v1/mcp-servers",
        {
            "name": "S",
            "url": "https://mcp.example.com/mcp",
            "headers": {"X-Token": "tok-SECRET-77"},
        },
    ).json()
    assert provider["api_key_last4"] == "1234" and server["header_names"] == ["X-Token"]
    everything = "".join(
        client.get(url).content.decode()
        for url in (
            "/api/v1/providers",
            f"/api/v1/providers/{provider['id']}",
            "/api/v1/mcp-servers",
            f"/api/v1/mcp-servers/{server['id']}",
            "/api/v1/audit-events?limit=100",
        )
    )
    assert "sk-very-secret" not in everything and "tok-SECRET" not in everything
    # omitting the key on update keeps it; "" removes it
    kept = _post(
        client,
        f"/api/v1/providers/{provider['id']}",
        {"name": "P", "base_url": "https://llm.example.com/v1", "default_model": "m2"},
        method="put",
    )
    assert kept.json()["has_api_key"] is True
    removed = _post(
        client,
        f"/api/v1/providers/{provider['id']}",
        {
            "name": "P",
            "base_url": "https://llm.example.com/v1",
            "default_model": "m2",
            "api_key": "",
        },
        method="put",
    )
    assert removed.json()["has_api_key"] is False


def test_a_read_key_can_read_but_not_write(world_a, api_client):
    client = api_client(world_a.read_key_raw)
    assert client.get("/api/v1/agents").status_code == 200
    assert client.get("/api/v1/tools").status_code == 200
    response = _post(client, "/api/v1/agents", {"name": "nope"})
    assert response.status_code == 403 and response.json()["metadata"]["required_scope"] == "admin"


def test_references_to_another_tenant_are_404_and_bad_configs_422(world_a, world_b, api_client):
    theirs = services.provider_create(
        tenant=world_b.tenant,
        actor=world_b.actor(),
        name="T",
        base_url="https://t.example.com/v1",
        default_model="m",
    )
    client = api_client(world_a.admin_key_raw)
    response = _post(
        client, "/api/v1/agents", {"name": "X", "config": {"provider_id": str(theirs.pk)}}
    )
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    response = _post(
        client, "/api/v1/agents", {"name": "X", "config": {"model_settings": {"temperature": 7}}}
    )
    assert response.status_code == 422
    assert "config.model_settings.temperature" in response.json()["metadata"]["fields"]
    response = _post(client, "/api/v1/agents", {"name": "X", "config": {"tools": [{"name": "sh"}]}})
    assert response.status_code == 422 and "sh" in response.json()["message"]


def test_the_tool_catalogue_describes_each_tools_settings(world_a, api_client):
    tools = {t["name"]: t for t in api_client(world_a.read_key_raw).get("/api/v1/tools").json()}
    assert set(tools) == {"current_datetime", "calculator", "http_get", "run_agent"}
    assert "max_bytes" in tools["http_get"]["settings_schema"]["properties"]


def test_listing_the_tools_of_a_real_mcp_server(world_a, api_client, mcp_loopback):
    client = api_client(world_a.admin_key_raw)
    for transport, url in (("streamable_http", mcp_loopback.url), ("sse", mcp_loopback.sse_url)):
        server = _post(
            client, "/api/v1/mcp-servers", {"name": transport, "url": url, "transport": transport}
        ).json()
        listed = client.post(f"/api/v1/mcp-servers/{server['id']}/tools")
        assert listed.status_code == 200, listed.content
        assert {t["name"] for t in listed.json()} == {"add", "shout"}


def test_an_unreachable_mcp_server_is_reported_in_words(world_a, api_client, dead_port):
    client = api_client(world_a.admin_key_raw)
    server = _post(
        client,
        "/api/v1/mcp-servers",
        {"name": "down", "url": f"http://127.0.0.1:{dead_port}/mcp", "timeout_seconds": 2},
    ).json()
    response = client.post(f"/api/v1/mcp-servers/{server['id']}/tools")
    assert response.status_code == 502
    assert response.json()["message"].startswith("Could not list the tools of down:")


def test_rotating_the_encryption_key_keeps_every_secret(world_a, settings):
    old = settings.SECRETS_ENCRYPTION_KEYS[0]
    provider = services.provider_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="P",
        base_url="https://x.example.com/v1",
        default_model="m",
        api_key="sk-rotate-me-123456",
    )
    server = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="S",
        url="https://mcp.example.com/mcp",
        headers={"Authorization": "Bearer rotate"},
    )
    new = Fernet.generate_key().decode()
    settings.SECRETS_ENCRYPTION_KEYS = [new, old]
    out = io.StringIO()
    call_command("rotate_secrets", stdout=out)
    assert "2 secret(s) re-encrypted" in out.getvalue()
    settings.SECRETS_ENCRYPTION_KEYS = [new]  # the old key is gone now
    provider = ModelProvider.objects.for_tenant(world_a.tenant).get(pk=provider.pk)
    server = McpServer.objects.for_tenant(world_a.tenant).get(pk=server.pk)
    assert crypto.decrypt(provider.api_key_encrypted) == "sk-rotate-me-123456"
    assert services.mcp_headers(server) == {"Authorization": "Bearer rotate"}
