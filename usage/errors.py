from controlplane.errors import QuotaExceeded


class BudgetExhausted(QuotaExceeded):
    """The tenant's monthly budget is used up. 402, not 429: retrying soon cannot help (a
    client that honours 429 + Retry-After would keep trying until the month ends).

    `message` is for the API (an integrator, who may hold an admin key); a person in the
    dashboard or the chat gets `message_for(role, ...)`, which says what they can do about it:
    only owners change the budget, and only owners and admins can open its page."""

    code = "budget_exhausted"
    status = 402

    def __init__(self, used: str, *, resets_on: str) -> None:
        self.used = used  # "This tenant has used its monthly budget (…); it resets on 1 May."
        super().__init__(
            f"{used} An owner can raise it in Settings → Monthly budget.", resets_on=resets_on
        )

    def message_for(self, role: str, *, tenant_name: str) -> str:
        """The refusal in the words for a member of that role."""
        if role == "owner":
            return f"{self.used} You can raise it in Settings → Monthly budget."
        if role == "admin":  # admins see the budget's page, read-only
            return f"{self.used} An owner can raise it; see Settings → Monthly budget."
        return f"{self.used} Ask an owner of {tenant_name} to raise it."
