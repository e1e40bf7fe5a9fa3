"""Dashboard forms of the usage app. Services validate again; these give errors next to fields."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms

from usage import services
from usage.models import COST_LIMIT_MAX, TOKEN_LIMIT_MAX
from usage.selectors import GROUPS, PRESETS

PRICE_HELP = "US dollars per 1 million tokens."


class PeriodForm(forms.Form):
    period = forms.ChoiceField(
        choices=list(PRESETS.items()),
        required=False,
        error_messages={"invalid_choice": "Pick one of the periods in the list."},
    )
    # The period whose days the From/To fields showed when the form was drawn (hidden): the
    # dates are a choice of their own only when they differ from that period's days.
    shown = forms.ChoiceField(
        choices=list(PRESETS.items()), required=False, widget=forms.HiddenInput
    )
    since = forms.DateField(
        required=False,
        label="From",
        widget=forms.DateInput(attrs={"type": "date"}),
        error_messages={"invalid": "A day, as YYYY-MM-DD."},
    )
    until = forms.DateField(
        required=False,
        label="To",
        widget=forms.DateInput(attrs={"type": "date"}),
        error_messages={"invalid": "A day, as YYYY-MM-DD."},
    )
    by = forms.ChoiceField(
        choices=[(k, v) for k, v in GROUPS.items() if k != "day"], required=False
    )
    metric = forms.ChoiceField(
        choices=[("total_tokens", "Tokens"), ("cost", "Cost")], required=False
    )


class PriceForm(forms.Form):
    model = forms.CharField(
        max_length=200,
        help_text="Exactly as the agent asks the provider for it, e.g. gpt-4o-mini.",
    )
    provider = forms.ChoiceField(
        required=False, help_text="Leave on “Any provider” unless one provider charges differently."
    )
    input_per_million = forms.DecimalField(
        label="Input", min_value=Decimal(0), max_digits=12, decimal_places=6, help_text=PRICE_HELP
    )
    cached_input_per_million = forms.DecimalField(
        label="Cached input",
        required=False,
        min_value=Decimal(0),
        max_digits=12,
        decimal_places=6,
        help_text="Empty: the same as input.",
    )
    output_per_million = forms.DecimalField(
        label="Output", min_value=Decimal(0), max_digits=12, decimal_places=6, help_text=PRICE_HELP
    )
    note = forms.CharField(max_length=200, required=False)

    def __init__(self, *args, providers=(), **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.fields["provider"].choices = [("", "Any provider")] + [  # type: ignore[attr-defined]
            (str(p.pk), p.name) for p in providers
        ]

    def values(self) -> dict:
        data = self.cleaned_data
        return {
            "model": data["model"],
            "provider_id": data["provider"] or None,
            "input_per_million": data["input_per_million"],
            "cached_input_per_million": data["cached_input_per_million"],
            "output_per_million": data["output_per_million"],
            "note": data["note"],
        }


class BudgetForm(forms.Form):
    """Parses the numbers; the ranges are `services.budget_errors`, so each field shows one
    sentence that names it and a readable maximum, never a database column's limit."""

    token_limit = forms.IntegerField(
        required=False,
        label="Tokens per month",
        help_text="Empty: no token limit.",
        error_messages={"invalid": "The token limit is a whole number of tokens."},
        widget=forms.NumberInput(attrs={"min": 1, "max": TOKEN_LIMIT_MAX, "step": 1}),
    )
    cost_limit = forms.DecimalField(
        required=False,
        label="Cost per month (USD)",
        help_text="Empty: no cost limit. Models without a price do not count towards it.",
        error_messages={"invalid": "The cost limit is an amount in dollars, e.g. 250.00."},
        widget=forms.NumberInput(attrs={"min": "0.01", "max": COST_LIMIT_MAX, "step": "0.01"}),
    )
    warn_percent = forms.IntegerField(
        initial=80,
        label="Warn at (%)",
        help_text="Owners and admins see a banner from this share of either limit on.",
        error_messages={
            "required": "The warning threshold is a percentage from 1 to 100.",
            "invalid": "The warning threshold is a percentage from 1 to 100.",
        },
        widget=forms.NumberInput(attrs={"min": 1, "max": 100, "step": 1}),
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        # Only the fields that parsed: one that did not already has its message.
        errors = services.budget_errors(
            token_limit=data.get("token_limit"),
            cost_limit=data.get("cost_limit"),
            warn_percent=data.get("warn_percent"),
        )
        for name, message in errors.items():
            self.add_error(name, message)
        return data
