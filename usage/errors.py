from controlplane.errors import QuotaExceeded


class BudgetExhausted(QuotaExceeded):
    """The tenant's monthly budget is used up. 402, not 429: retrying soon cannot help (a
    client that honours 429 + Retry-After would keep trying until the month ends)."""

    code = "budget_exhausted"
    status = 402
