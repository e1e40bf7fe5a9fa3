from django.apps import AppConfig


class AgentsConfig(AppConfig):
    # The package cannot be called `agents`: that is the import name of the OpenAI Agents SDK.
    # The app label keeps the domain's name (tables `agents_*`, `agents.Agent`).
    name = "ai_agents"
    label = "agents"
    verbose_name = "Agents"

    def ready(self) -> None:
        # The SDK would export traces to OpenAI; the project keeps its own trace of each run.
        from agents import set_tracing_disabled

        set_tracing_disabled(True)
