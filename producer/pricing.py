"""What tokens cost, from the optional price table ``SIBYLQ_PRICES``."""

from __future__ import annotations

from wire.contract import Usage
from wire.modelref import ModelRef
from wire.settings import Price, Settings


def price_for(ref: ModelRef, settings: Settings) -> Price | None:
    """The price of ``ref``: listed under its full name (``openai:gpt-4o-mini``) or its model
    name (``gpt-4o-mini``); None when not listed."""
    return settings.prices.get(str(ref)) or settings.prices.get(ref.name)


def cost_usd(usage: Usage, price: Price) -> float:
    return (usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / 1e6
