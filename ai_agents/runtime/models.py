"""Model instances for a run: the built-in offline model, or a tenant's OpenAI-compatible
endpoint reached through the egress-guarded HTTP client."""

from __future__ import annotations

from agents import Model, OpenAIChatCompletionsModel, OpenAIResponsesModel
from django.conf import settings
from openai import AsyncOpenAI

from ai_agents.models import ModelProvider, ProviderApi
from ai_agents.runtime.trace import identify
from controlplane import crypto


def offline_model() -> Model:
    from ai_agents.runtime.offline import OfflineModel

    return identify(
        OfflineModel(token_delay=settings.OFFLINE_MODEL_WORD_DELAY),
        name="offline",
        provider_id=None,
        provider="builtin",
    )


def openai_client(provider: ModelProvider) -> AsyncOpenAI:
    from controlplane import egress

    key = crypto.decrypt(provider.api_key_encrypted) if provider.api_key_encrypted else "none"
    return AsyncOpenAI(
        base_url=provider.base_url,
        api_key=key,
        max_retries=0,
        timeout=provider.timeout_seconds,
        http_client=egress.guarded_openai_http_client(timeout=provider.timeout_seconds),
    )


def provider_model(provider: ModelProvider, *, model_name: str) -> Model:
    client = openai_client(provider)
    model: Model
    if provider.api == ProviderApi.RESPONSES:
        model = OpenAIResponsesModel(model=model_name, openai_client=client)
    else:
        model = OpenAIChatCompletionsModel(model=model_name, openai_client=client)
    return identify(model, name=model_name, provider_id=str(provider.pk), provider=provider.name)
