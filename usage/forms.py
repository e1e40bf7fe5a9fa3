"""Dashboard forms of the usage app. Services validate again; these give errors next to fields."""

from __future__ import annotations

from decimal import Decimal

from django import forms

from usage.models import COST_LIMIT_MAX, TOKEN_LIMIT_MAX
from usage.selectors import GROUPS, PRESETS

PRICE_HELP = "US dollars per 1 million tokens."


class PeriodForm(forms.Form):
    period = forms.ChoiceField(choices=list(PRESETS.items()), required=False)
    # The period whose days the From/To fields showed when the form was drawn (hidden): the
    # dates are a choice of their own only when they differ from that period's days.
    shown = forms.ChoiceField(
        choices=list(PRESETS.items()), required=False, widget=forms.HiddenInput
    )
    since = forms.DateField(
        required=False, label="From", widget=forms.DateInput(attrs={"type": "date"})
    )
    until = forms.DateField(
        required=False, label="To", widget=forms.DateInput(attrs={"type": "date"})
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
    token_limit = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=TOKEN_LIMIT_MAX,
        label="Tokens per month",
        help_text="Empty: no token limit.",
    )
    cost_limit = forms.DecimalField(
        required=False,
        min_value=Decimal("0.01"),
        max_value=COST_LIMIT_MAX,
        max_digits=14,
        decimal_places=2,
        label="Cost per month (USD)",
        help_text="Empty: no cost limit. Models without a price do not count towards it.",
    )
    warn_percent = forms.IntegerField(
        min_value=1,
        max_value=100,
        initial=80,
        label="Warn at (%)",
        help_text="Owners and admins see a banner from this share of either limit on.",
    )
