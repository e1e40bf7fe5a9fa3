from django.test import Client


def test_healthz_reports_every_part(db):
    response = Client().get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["down"] == []
    assert set(body["checks"]) == {"database", "redis", "broker"}
    assert all(check["ok"] for check in body["checks"].values())


def test_healthz_answers_503_naming_the_part_that_is_down(db, settings):
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": "redis://127.0.0.1:1/0"}
    }
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    response = Client().get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down" and body["down"] == ["redis", "broker"]
    assert body["checks"]["database"]["ok"] is True
    assert "Connection" in body["checks"]["redis"]["error"]
    assert response["Cache-Control"].startswith("max-age=0")


def test_idle_websockets_outlive_the_channel_layers_blocking_receive(settings):
    """redis-py 8 times out socket reads after 5 s by default, which is exactly how long
    channels-redis blocks on a receive: the race killed idle websockets. Reads must be allowed
    to block longer than the layer's receive."""
    from channels_redis.core import RedisChannelLayer

    [host] = settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"]
    assert host["socket_timeout"] > RedisChannelLayer.brpop_timeout
