"""List prices of well-known OpenAI models, offered to admins as a starting point.

They are OpenAI's published prices per one million tokens (standard tier) as of August 2025.
Prices change and contracts differ: the dashboard labels them as list prices to check, and
nothing is priced until an admin adds them.
"""

from __future__ import annotations

from decimal import Decimal

LIST_PRICE_NOTE = "OpenAI list price, August 2025: check it against your contract"

# model: (input, cached input, output), USD per 1M tokens
OPENAI_LIST_PRICES: dict[str, tuple[Decimal, Decimal, Decimal]] = {
    "gpt-5": (Decimal("1.25"), Decimal("0.125"), Decimal("10.00")),
    "gpt-5-mini": (Decimal("0.25"), Decimal("0.025"), Decimal("2.00")),
    "gpt-5-nano": (Decimal("0.05"), Decimal("0.005"), Decimal("0.40")),
    "gpt-4.1": (Decimal("2.00"), Decimal("0.50"), Decimal("8.00")),
    "gpt-4.1-mini": (Decimal("0.40"), Decimal("0.10"), Decimal("1.60")),
    "gpt-4.1-nano": (Decimal("0.10"), Decimal("0.025"), Decimal("0.40")),
    "gpt-4o": (Decimal("2.50"), Decimal("1.25"), Decimal("10.00")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.075"), Decimal("0.60")),
    "o3": (Decimal("2.00"), Decimal("0.50"), Decimal("8.00")),
    "o4-mini": (Decimal("1.10"), Decimal("0.275"), Decimal("4.40")),
}
