from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib.auth import password_validation
from django.contrib.auth.forms import AuthenticationForm
from django.utils import timezone

from controlplane.errors import ValidationFailed
from tenants import limits
from tenants.models import ApiKeyScope, Role, Tenant


def apply_domain_errors(form: forms.Form, exc: ValidationFailed) -> None:
    """Put a service's field errors next to the fields; the rest above the form."""
    placed = False
    for field, message in exc.fields.items():
        if field in form.fields:
            form.add_error(field, message)
            placed = True
    if not placed:
        form.add_error(None, exc.message)


class LoginForm(AuthenticationForm):
    username = forms.EmailField(
        label="E-mail", widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email"})
    )


class PasswordFields(forms.Form):
    password1 = forms.CharField(
        label="Password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="At least 8 characters; not a common password.",
    )
    password2 = forms.CharField(
        label="Repeat the password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def clean(self):
        data = super().clean() or {}
        p1, p2 = data.get("password1"), data.get("password2")
        if p1 and p2 and p1 != p2:
            self.add_error("password2", "The two passwords differ.")
        elif p1:
            try:
                password_validation.validate_password(p1)
            except forms.ValidationError as exc:
                self.add_error("password1", exc)
        return data


class SignupForm(PasswordFields):
    field_order = ["name", "email", "tenant_name", "password1", "password2"]
    name = forms.CharField(label="Your name", max_length=150, required=False)
    email = forms.EmailField(
        label="Work e-mail", widget=forms.EmailInput(attrs={"autocomplete": "email"})
    )
    tenant_name = forms.CharField(
        label="Team or company",
        max_length=100,
        help_text="Your first tenant. You can create more and invite people later.",
    )


class InvitationSignupForm(PasswordFields):
    field_order = ["name", "password1", "password2"]
    name = forms.CharField(label="Your name", max_length=150, required=False)


class TenantForm(forms.Form):
    name = forms.CharField(max_length=100)
    slug = forms.SlugField(
        label="Address",
        max_length=50,
        required=False,
        help_text="Appears in links: /t/<address>/. Leave empty to derive it from the name.",
    )


class InviteForm(forms.Form):
    email = forms.EmailField(
        label="E-mail", widget=forms.EmailInput(attrs={"placeholder": "name@company.com"})
    )
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


EXPIRY_CHOICES = [("", "Never"), ("30", "In 30 days"), ("90", "In 90 days"), ("365", "In a year")]


def limit_field(label: str, default: int) -> forms.Field:
    """An optional limit: empty for the default (shown as the placeholder), 0 for none."""
    placeholder = "default: no limit" if default == 0 else f"default: {default:,}"
    return forms.IntegerField(
        label=label,
        required=False,
        min_value=0,
        max_value=limits.MAX_LIMIT,
        widget=forms.NumberInput(
            attrs={"placeholder": placeholder, "min": 0, "inputmode": "numeric"}
        ),
    )


class TenantLimitsForm(forms.Form):
    """The tenant's rate limits; each empty field uses the operator's default."""

    LABELS = {
        "end_user_runs_per_minute": "Runs per end user per minute",
        "end_user_runs_per_hour": "Runs per end user per hour",
        "api_key_requests_per_minute": "API requests per key per minute",
        "api_key_runs_per_minute": "Runs per API key per minute",
    }

    def __init__(self, *args, tenant: Tenant, **kwargs):
        super().__init__(*args, **kwargs)
        for field, label in self.LABELS.items():
            self.fields[field] = limit_field(label, limits.default(field))
            self.initial.setdefault(field, getattr(tenant, field))


class ApiKeyLimitsForm(forms.Form):
    """A key's own limits; each empty field uses the tenant's limit for keys."""

    def __init__(self, *args, tenant: Tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["requests_per_minute"] = limit_field(
            "Requests per minute", limits.tenant_limit(tenant, "api_key_requests_per_minute")
        )
        self.fields["runs_per_minute"] = limit_field(
            "Runs per minute", limits.tenant_limit(tenant, "api_key_runs_per_minute")
        )


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        widget=forms.TextInput(attrs={"placeholder": "e.g. CI pipeline, support bot"}),
    )
    scopes = forms.MultipleChoiceField(
        choices=ApiKeyScope.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=[ApiKeyScope.READ, ApiKeyScope.RUN],
        error_messages={"required": "Choose at least one scope."},
    )
    expires_in = forms.ChoiceField(choices=EXPIRY_CHOICES, required=False, label="Expires")

    def __init__(self, *args, tenant: Tenant, **kwargs):
        super().__init__(*args, **kwargs)
        # The key's own limits; the placeholders say what an empty field means.
        self.fields.update(ApiKeyLimitsForm(tenant=tenant).fields)

    def expires_at(self):
        days = self.cleaned_data.get("expires_in")
        return timezone.now() + timedelta(days=int(days)) if days else None


class AuditFilterForm(forms.Form):
    action = forms.CharField(required=False, max_length=64)
    actor = forms.CharField(
        required=False,
        max_length=255,
        widget=forms.TextInput(attrs={"placeholder": "e-mail or key"}),
    )
    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
