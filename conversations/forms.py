"""Forms of the run inspector: the filters of the runs list (all in the query string, so a
filtered view is a link that can be shared)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from django import forms
from django.utils import timezone

from conversations.inspector import RANGE_PRESETS, RunFilters
from conversations.models import RunSource, RunStatus

DATETIME_FORMATS = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"]


class TimeFilterForm(forms.Form):
    """Agent and time: the filters every list of runs has."""

    agent = forms.ChoiceField(required=False, label="Agent")
    range = forms.ChoiceField(
        required=False,
        label="Time",
        choices=[("", "Any time"), *((k, label) for k, (label, _) in RANGE_PRESETS.items())],
    )
    since = forms.DateTimeField(
        required=False,
        label="From (UTC)",
        input_formats=DATETIME_FORMATS,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
    )
    until = forms.DateTimeField(
        required=False,
        label="To (UTC)",
        input_formats=DATETIME_FORMATS,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
    )

    def __init__(self, data: Any = None, *, agents: list[Any]) -> None:
        super().__init__(data)
        agent_field = self.fields["agent"]
        assert isinstance(agent_field, forms.ChoiceField)
        agent_field.choices = [("", "Any agent")] + [(str(a.pk), a.name) for a in agents]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and since >= until:
            self.add_error("until", "“To” must be after “From”.")
        return data

    def filters(self, *, now: datetime | None = None) -> RunFilters:
        """The filters of a valid form. A preset range counts back from now; explicit From/To
        dates win over it."""
        data = self.cleaned_data
        since, until = data.get("since"), data.get("until")
        if data.get("range") and not since and not until:
            since = (now or timezone.now()) - RANGE_PRESETS[data["range"]][1]
        return RunFilters(
            agent_id=UUID(data["agent"]) if data.get("agent") else None,
            status=data.get("status") or "",
            source=data.get("source") or "",
            end_user=data.get("user") or "",
            thread_id=data.get("thread"),
            since=since,
            until=until,
        )

    def error_list(self) -> list[str]:
        """Each error as one sentence that names the filter."""
        out = []
        for name, errors in self.errors.items():
            label = self.fields[name].label if name in self.fields else ""
            for error in errors:
                out.append(f"{label}: {error}" if label else str(error))
        return out


class RunFilterForm(TimeFilterForm):
    """The filters of the conversation runs list."""

    status = forms.ChoiceField(
        required=False,
        label="Status",
        choices=[("", "Any status"), ("active", "Active (pending or running)"), *RunStatus.choices],
    )
    source = forms.ChoiceField(
        required=False, label="Source", choices=[("", "Any source"), *RunSource.choices]
    )
    user = forms.CharField(
        required=False,
        max_length=200,
        label="End user",
        widget=forms.TextInput(
            attrs={"placeholder": "Name, e-mail or external id", "type": "search"}
        ),
    )
    # Set by the run page's "Runs of this conversation" link, never typed: its error names it.
    thread = forms.UUIDField(
        required=False,
        label="Conversation",
        widget=forms.HiddenInput,
        error_messages={"invalid": "The link to a conversation's runs is not valid."},
    )
