"""Dashboard forms for agents, model providers and MCP servers.

The forms only parse what a browser sends (text into numbers, lists and JSON). What is *valid* is
decided once, by `ai_agents.config.AgentConfig`, the tool settings models and the services; their
errors come back as `ValidationFailed.fields` and are placed next to the matching field here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from django import forms
from django.forms.formsets import BaseFormSet, formset_factory
from pydantic import BaseModel, ValidationError

from ai_agents import tools
from ai_agents.config import GUARDRAIL_LABELS
from ai_agents.models import Agent, McpServer, McpTransport, ModelProvider, ProviderApi
from controlplane.errors import ValidationFailed


def _split(text: str, sep: str = ",") -> list[str]:
    return [part.strip() for part in text.split(sep) if part.strip()]


def _message(error: Any) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


# --- Agents: create, details, publish, playground ---------------------------------------------


class AgentCreateForm(forms.Form):
    name = forms.CharField(
        max_length=100, widget=forms.TextInput(attrs={"placeholder": "e.g. Support assistant"})
    )
    description = forms.CharField(
        max_length=2000,
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "What it is for (other agents see this too)"}),
        help_text="Shown to agents that can hand off to this one.",
    )


class AgentDetailsForm(AgentCreateForm):
    description = forms.CharField(
        max_length=2000,
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Not versioned: a new name or description applies at once.",
    )


class PublishForm(forms.Form):
    note = forms.CharField(
        max_length=200,
        required=False,
        label="Release note",
        widget=forms.TextInput(attrs={"placeholder": "What changed (optional)"}),
    )


class PlaygroundForm(forms.Form):
    message = forms.CharField(
        max_length=20_000,
        label="Message",
        widget=forms.Textarea(
            attrs={"rows": 3, "placeholder": "Say hello, or ask it to use one of its tools"}
        ),
        error_messages={"required": "Type a message to send to the agent."},
    )


# --- Agent editor -----------------------------------------------------------------------------


class GuardrailForm(forms.Form):
    """One guardrail. `value` means what the kind needs: comma-separated words, a regular
    expression, a number of characters, or a yes/no question."""

    kind = forms.ChoiceField(choices=[("", "— none —"), *GUARDRAIL_LABELS.items()], required=False)
    value = forms.CharField(max_length=1000, required=False, label="Rule")
    message = forms.CharField(
        max_length=500,
        required=False,
        label="Message shown instead",
        widget=forms.TextInput(attrs={"placeholder": "Sorry, I can't help with that request."}),
    )

    @staticmethod
    def initial_for(guardrail: dict[str, Any]) -> dict[str, str]:
        kind = guardrail.get("kind", "")
        value = {
            "blocked_words": ", ".join(guardrail.get("words") or []),
            "pattern": guardrail.get("pattern", ""),
            "max_length": str(guardrail.get("max_chars") or ""),
            "classifier": guardrail.get("question", ""),
        }.get(kind, "")
        return {"kind": kind, "value": value, "message": guardrail.get("message", "")}

    def guardrail(self) -> dict[str, Any] | None:
        """The configuration of this row, or None for a row left empty (or emptied: removed)."""
        data = getattr(self, "cleaned_data", None) or {}
        kind, value = data.get("kind"), (data.get("value") or "").strip()
        if not kind:
            return None
        out: dict[str, Any] = {"kind": kind, "message": (data.get("message") or "").strip()}
        if kind == "blocked_words":
            out["words"] = _split(value)
        elif kind == "pattern":
            out["pattern"] = value
        elif kind == "max_length":
            out["max_chars"] = int(value) if value.isdigit() else None
        else:
            out["question"] = value
        return out

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        value = (data.get("value") or "").strip()
        if data.get("kind") == "max_length" and value and not value.isdigit():
            self.add_error("value", "Enter a whole number of characters, e.g. 2000.")
        return data


GuardrailFormSet = formset_factory(
    GuardrailForm, extra=1, max_num=16, validate_max=True, absolute_max=32
)

# Help for the settings of built-in tools, by setting name (the settings models have no prose).
TOOL_SETTING_HELP = {
    "default_timezone": "An IANA name such as Europe/Paris.",
    "max_bytes": "Largest page it reads.",
    "timeout_seconds": "Seconds before giving up.",
    "allowed_domains": "Comma-separated. Empty: any public site.",
    "allowed_agents": "Agent slugs, comma-separated. Empty: any published agent.",
}

# Service error paths (config paths) and the form field that shows them. The longest matching
# prefix wins; guardrail paths are placed on their row of the guardrail lists.
CONFIG_FIELDS = {
    "instructions": "instructions",
    "provider_id": "provider",
    "model": "model",
    "model_settings.temperature": "temperature",
    "model_settings.top_p": "top_p",
    "model_settings.max_output_tokens": "max_output_tokens",
    "max_turns": "max_turns",
    "tools": "tools",
    "mcp_servers": "mcp_servers",
    "handoffs": "handoffs",
    "output_schema": "output_schema",
}
GUARDRAIL_SIDES = ("input_guardrails", "output_guardrails")


def _tool_field(name: str, setting: str) -> str:
    return f"tool__{name}__{setting}"


class AgentConfigForm(forms.Form):
    """Everything of `AgentConfig` the editor shows, except the two guardrail lists (formsets)."""

    instructions = forms.CharField(
        max_length=50_000,
        required=False,
        strip=False,
        widget=forms.Textarea(
            attrs={
                "rows": 12,
                "placeholder": "You are a helpful assistant for ...",
                "aria-labelledby": "instructions-heading",
            }
        ),
        help_text="The system prompt: who the agent is, what it does and how it answers.",
    )
    provider = forms.ChoiceField(required=False, label="Model provider")
    model = forms.CharField(
        max_length=200,
        required=False,
        label="Model",
        widget=forms.TextInput(attrs={"placeholder": "Provider default"}),
        help_text="Leave empty for the provider's default model.",
    )
    temperature = forms.FloatField(required=False, help_text="0 to 2. Empty: the model's default.")
    top_p = forms.FloatField(required=False, label="Top p", help_text="0 to 1.")
    max_output_tokens = forms.IntegerField(
        required=False, label="Max output tokens", help_text="Per model call."
    )
    max_turns = forms.IntegerField(
        label="Max turns", help_text="Model calls per run (tools and handoffs included), 1–100."
    )
    tools = forms.MultipleChoiceField(required=False)
    mcp_servers = forms.MultipleChoiceField(required=False, label="MCP servers")
    mcp_required = forms.MultipleChoiceField(required=False)
    handoffs = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="Handoffs"
    )
    output_schema = forms.CharField(
        required=False,
        label="Structured output (JSON schema)",
        widget=forms.Textarea(
            attrs={
                "rows": 6,
                "class": "mono",
                "spellcheck": "false",
                "placeholder": '{"type": "object", "properties": {"answer": {"type": "string"}}}',
            }
        ),
        help_text='Optional. A JSON schema with "type": "object"; the agent then answers '
        "with JSON that matches it.",
    )

    def __init__(
        self,
        data: Any = None,
        *,
        config: dict[str, Any],
        providers: Sequence[ModelProvider],
        servers: Sequence[McpServer],
        agents: Sequence[Agent],
    ) -> None:
        super().__init__(data, initial=self._initial(config))
        self.servers = list(servers)
        self.provider_field.choices = [
            ("", "Built-in offline model"),
            *[(str(p.pk), f"{p.name} · {p.default_model}") for p in providers],
        ]
        self.choice_field("tools").choices = [(name, name) for name in tools.CATALOGUE]
        server_choices = [(str(s.pk), s.name) for s in self.servers]
        self.choice_field("mcp_servers").choices = server_choices
        self.choice_field("mcp_required").choices = server_choices
        self.choice_field("handoffs").choices = [
            (
                str(a.pk),
                a.name if a.published_version_id else f"{a.name} (not published yet: skipped)",
            )
            for a in agents
        ]
        # The settings of every catalogue tool, as text fields; the tool's own settings model
        # parses and checks them in `clean`.
        self.tool_settings: dict[str, list[str]] = {}
        self.list_settings: set[str] = set()
        current = {t.get("name"): t.get("settings", {}) for t in config.get("tools", [])}
        for name, spec in tools.CATALOGUE.items():
            defaults = spec.settings_model().model_dump(mode="json")
            values = {**defaults, **current.get(name, {})}
            self.tool_settings[name] = []
            for setting, info in spec.settings_model.model_fields.items():
                field_name = _tool_field(name, setting)
                value = values.get(setting)
                is_list = isinstance(defaults.get(setting), list)
                if is_list:
                    self.list_settings.add(field_name)
                self.fields[field_name] = forms.CharField(
                    required=False,
                    max_length=2000,
                    label=info.title or setting.replace("_", " ").capitalize(),
                    help_text=TOOL_SETTING_HELP.get(setting, ""),
                    initial=", ".join(value or []) if is_list else value,
                )
                self.tool_settings[name].append(setting)

    @property
    def provider_field(self) -> forms.ChoiceField:
        return self.choice_field("provider")

    def choice_field(self, name: str) -> forms.ChoiceField:
        field = self.fields[name]
        assert isinstance(field, forms.ChoiceField)
        return field

    @staticmethod
    def _initial(config: dict[str, Any]) -> dict[str, Any]:
        settings = config.get("model_settings") or {}
        mcp = config.get("mcp_servers") or []
        schema = config.get("output_schema")
        return {
            "instructions": config.get("instructions", ""),
            "provider": config.get("provider_id") or "",
            "model": config.get("model", ""),
            "temperature": settings.get("temperature"),
            "top_p": settings.get("top_p"),
            "max_output_tokens": settings.get("max_output_tokens"),
            "max_turns": config.get("max_turns", 10),
            "tools": [t["name"] for t in config.get("tools", [])],
            "mcp_servers": [str(m["server_id"]) for m in mcp],
            "mcp_required": [str(m["server_id"]) for m in mcp if m.get("required")],
            "handoffs": [str(h) for h in config.get("handoffs", [])],
            "output_schema": json.dumps(schema, indent=2) if schema else "",
        }

    def clean_output_schema(self) -> dict[str, Any] | None:
        text = self.cleaned_data.get("output_schema", "").strip()
        if not text:
            return None
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"This is not valid JSON: {exc}.") from None
        if not isinstance(schema, dict):
            raise forms.ValidationError('Enter a JSON object, e.g. {"type": "object", ...}.')
        return schema

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        self.tool_configs: list[dict[str, Any]] = []
        for name in data.get("tools") or []:
            spec = tools.CATALOGUE[name]
            raw: dict[str, Any] = {}
            for setting in self.tool_settings[name]:
                field_name = _tool_field(name, setting)
                text = (data.get(field_name) or "").strip()
                if field_name in self.list_settings:
                    raw[setting] = _split(text)
                elif text:
                    raw[setting] = text
            try:
                settings = spec.settings_model.model_validate(raw)
            except ValidationError as exc:
                for error in exc.errors():
                    setting = str(error["loc"][0]) if error["loc"] else ""
                    target = _tool_field(name, setting)
                    self.add_error(target if target in self.fields else "tools", _message(error))
                continue
            self.tool_configs.append({"name": name, "settings": _dump(settings)})
        return data

    def tool_rows(self) -> list[dict[str, Any]]:
        """The catalogue, for the template: each tool, whether it is on, its settings fields."""
        chosen = set(self["tools"].value() or [])
        return [
            {
                "spec": spec,
                "checked": name in chosen,
                "fields": [self[_tool_field(name, s)] for s in self.tool_settings[name]],
            }
            for name, spec in tools.CATALOGUE.items()
        ]

    def mcp_rows(self) -> list[dict[str, Any]]:
        chosen = set(self["mcp_servers"].value() or [])
        required = set(self["mcp_required"].value() or [])
        return [
            {"server": s, "checked": str(s.pk) in chosen, "required": str(s.pk) in required}
            for s in self.servers
        ]

    def config(self) -> dict[str, Any]:
        data = self.cleaned_data
        required = set(data["mcp_required"])
        return {
            "instructions": data["instructions"],
            "provider_id": data["provider"] or None,
            "model": data["model"].strip(),
            "model_settings": {
                "temperature": data["temperature"],
                "top_p": data["top_p"],
                "max_output_tokens": data["max_output_tokens"],
            },
            "max_turns": data["max_turns"],
            "tools": self.tool_configs,
            "mcp_servers": [
                {"server_id": sid, "required": sid in required} for sid in data["mcp_servers"]
            ],
            "handoffs": data["handoffs"],
            "output_schema": data["output_schema"],
        }


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


class AgentEditor:
    """The editor's form and its two guardrail lists, validated and saved as one configuration."""

    def __init__(
        self,
        data: Any = None,
        *,
        config: dict[str, Any],
        providers: Sequence[ModelProvider],
        servers: Sequence[McpServer],
        agents: Sequence[Agent],
    ) -> None:
        self.form = AgentConfigForm(
            data, config=config, providers=providers, servers=servers, agents=agents
        )
        self.guardrails: dict[str, BaseFormSet] = {
            side: GuardrailFormSet(
                data,
                prefix=side,
                initial=[GuardrailForm.initial_for(g) for g in config.get(side) or []],
            )
            for side in GUARDRAIL_SIDES
        }
        # Errors about a whole guardrail list (e.g. too many), shown above that list.
        self.list_errors: dict[str, str] = {}
        self._rows: dict[str, list[int]] = {side: [] for side in GUARDRAIL_SIDES}

    @property
    def input_guardrails(self) -> BaseFormSet:
        return self.guardrails["input_guardrails"]

    @property
    def output_guardrails(self) -> BaseFormSet:
        return self.guardrails["output_guardrails"]

    def is_valid(self) -> bool:
        results = [self.form.is_valid()] + [fs.is_valid() for fs in self.guardrails.values()]
        return all(results)

    def config(self) -> dict[str, Any]:
        """The configuration to save: only call after `is_valid()`."""
        config = self.form.config()
        for side, formset in self.guardrails.items():
            rows: list[dict[str, Any]] = []
            self._rows[side] = []
            for index, row in enumerate(formset.forms):
                assert isinstance(row, GuardrailForm)
                guardrail = row.guardrail()
                if guardrail is not None:
                    rows.append(guardrail)
                    self._rows[side].append(index)
            config[side] = rows
        return config

    def apply_domain_errors(self, exc: ValidationFailed) -> None:
        """Place each `ValidationFailed.fields` path (e.g. `input_guardrails.0.pattern`,
        `model_settings.temperature`) next to its field; anything else goes above the form."""
        for path, message in exc.fields.items():
            parts = path.split(".")
            if parts[0] in self.guardrails:
                self._guardrail_error(parts, message)
                continue
            for n in range(len(parts), 0, -1):
                field = CONFIG_FIELDS.get(".".join(parts[:n]))
                if field:
                    self.form.add_error(field, message)
                    break
            else:
                self.form.add_error(None, f"{path}: {message}" if path != "config" else message)
        if not exc.fields:
            self.form.add_error(None, exc.message)

    def _guardrail_error(self, parts: list[str], message: str) -> None:
        side, rows = parts[0], self._rows[parts[0]]
        if len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(rows):
            row = self.guardrails[side].forms[rows[int(parts[1])]]
            field = parts[2] if len(parts) > 2 and parts[2] in ("kind", "message") else "value"
            row.add_error(field, message)
        else:
            self.list_errors[side] = message

    @property
    def has_errors(self) -> bool:
        return bool(
            self.form.errors
            or self.list_errors
            or any(fs.total_error_count() for fs in self.guardrails.values())
        )


# --- Model providers --------------------------------------------------------------------------


class ProviderForm(forms.Form):
    name = forms.CharField(
        max_length=100, widget=forms.TextInput(attrs={"placeholder": "e.g. OpenAI"})
    )
    base_url = forms.CharField(
        max_length=500,
        label="Base URL",
        widget=forms.TextInput(attrs={"placeholder": "https://api.openai.com/v1"}),
        help_text="Any OpenAI-compatible endpoint: OpenAI, Gemini, Ollama, vLLM, ...",
    )
    api = forms.ChoiceField(choices=ProviderApi.choices, label="API", initial=ProviderApi.CHAT)
    default_model = forms.CharField(
        max_length=200,
        label="Default model",
        widget=forms.TextInput(attrs={"placeholder": "e.g. gpt-4o-mini"}),
    )
    timeout_seconds = forms.FloatField(label="Timeout (seconds)", initial=60)
    api_key = forms.CharField(
        max_length=4000,
        required=False,
        strip=True,
        label="API key",
        # Never rendered back, not even after a validation error.
        widget=forms.PasswordInput(
            render_value=False, attrs={"autocomplete": "off", "spellcheck": "false"}
        ),
        help_text="Stored encrypted; only its last four characters are ever shown.",
    )

    def service_kwargs(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "name": data["name"],
            "base_url": data["base_url"],
            "api": data["api"],
            "default_model": data["default_model"],
            "timeout_seconds": data["timeout_seconds"],
        }


class ProviderEditForm(ProviderForm):
    remove_key = forms.BooleanField(required=False, label="Remove the stored key")

    def __init__(self, data: Any = None, *, provider: ModelProvider) -> None:
        super().__init__(
            data,
            initial={
                "name": provider.name,
                "base_url": provider.base_url,
                "api": provider.api,
                "default_model": provider.default_model,
                "timeout_seconds": provider.timeout_seconds,
            },
        )
        if provider.has_api_key:
            self.fields["api_key"].help_text = (
                f"A key ending in {provider.api_key_last4} is stored. "
                "Leave empty to keep it; type a new one to replace it."
            )

    def new_key(self) -> str | None:
        """None keeps the stored key, "" removes it (the service's contract)."""
        if self.cleaned_data["api_key"]:
            return str(self.cleaned_data["api_key"])
        return "" if self.cleaned_data["remove_key"] else None


# --- MCP servers ------------------------------------------------------------------------------


class SecretTextarea(forms.Textarea):
    """A textarea that never renders a value: what was typed stays out of every response."""

    def format_value(self, value: Any) -> None:
        return None


class McpServerForm(forms.Form):
    name = forms.CharField(
        max_length=100, widget=forms.TextInput(attrs={"placeholder": "e.g. GitHub tools"})
    )
    url = forms.CharField(
        max_length=500,
        label="URL",
        widget=forms.TextInput(attrs={"placeholder": "https://mcp.example.com/mcp"}),
    )
    transport = forms.ChoiceField(
        choices=McpTransport.choices,
        initial=McpTransport.STREAMABLE_HTTP,
        help_text="HTTP only. There is no stdio: it would run a program on the control "
        "plane's own servers.",
    )
    headers = forms.CharField(
        required=False,
        max_length=8000,
        widget=SecretTextarea(
            attrs={
                "rows": 3,
                "class": "mono",
                "spellcheck": "false",
                "autocomplete": "off",
                "placeholder": "Authorization: Bearer …",
            }
        ),
        help_text="One “Name: value” per line, e.g. for authentication. Stored encrypted and "
        "never shown again.",
    )
    tool_allowlist = forms.CharField(
        required=False,
        max_length=4000,
        label="Allowed tools",
        widget=forms.TextInput(attrs={"placeholder": "search, fetch_issue"}),
        help_text="Comma-separated tool names. Empty: every tool the server offers.",
    )
    timeout_seconds = forms.FloatField(label="Timeout (seconds)", initial=10)

    def clean_headers(self) -> dict[str, str] | None:
        text = self.cleaned_data.get("headers", "")
        if not text.strip():
            return None
        headers: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                # Never echo the line: it may hold a secret.
                raise forms.ValidationError(f"Line {number} is not of the form “Name: value”.")
            headers[name.strip()] = value.strip()
        return headers

    def service_kwargs(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "name": data["name"],
            "url": data["url"],
            "transport": data["transport"],
            "tool_allowlist": _split(data["tool_allowlist"]),
            "timeout_seconds": data["timeout_seconds"],
        }


class McpServerEditForm(McpServerForm):
    remove_headers = forms.BooleanField(required=False, label="Remove the stored headers")

    def __init__(self, data: Any = None, *, server: McpServer) -> None:
        super().__init__(
            data,
            initial={
                "name": server.name,
                "url": server.url,
                "transport": server.transport,
                "tool_allowlist": ", ".join(server.tool_allowlist),
                "timeout_seconds": server.timeout_seconds,
            },
        )
        if server.header_names:
            self.fields["headers"].help_text = (
                f"Stored: {', '.join(server.header_names)} (values hidden). Leave empty to keep "
                "them; anything typed here replaces them all."
            )

    def new_headers(self) -> dict[str, str] | None:
        """None keeps the stored headers, {} removes them (the service's contract)."""
        headers = self.cleaned_data["headers"]
        if headers:
            return dict(headers)
        return {} if self.cleaned_data["remove_headers"] else None


# --- Versions ---------------------------------------------------------------------------------


def version_choices(versions: Iterable[Any]) -> list[tuple[str, str]]:
    return [(str(v.pk), f"v{v.number}" if v.number else "Draft") for v in versions]
