"""Tools of the packaged example scenarios (pizza-llm, bank-llm): small, honest stand-ins for a
shop's order system and a bank's customer check. Each call keeps its own order and customer in the
call's shared `state` (visible to every agent's prompt), so nothing leaks between calls.

They show the contract for Python tools: keyword arguments from the model (validated here, since
a model's arguments can be anything), an optional `context` (a ToolContext), and a JSON-able result
the model reads back. Facts (menu, prices) come from the scenario file, never from the model.
"""

from __future__ import annotations

import zlib
from typing import Any

from parley.agents.tools import ToolContext

PIZZA_PRICES = {  # dollars by size; the pizza-llm scenario's facts say the same
    "small": 9.99,
    "medium": 13.99,
    "large": 16.99,
}
PIZZAS = ("pepperoni", "margherita", "hawaiian", "veggie")
EXTRAS = {"garlic bread": 4.5, "salad": 6.0, "soft drink": 2.0}


def add_to_order(item: str, size: str = "", quantity: int = 1, *, context: ToolContext) -> dict[str, Any]:
    """Add a pizza (with a size) or an extra to this call's order."""
    item, size = item.strip().lower(), size.strip().lower()
    quantity = int(quantity)
    if not 1 <= quantity <= 20:
        return {"error": "quantity must be between 1 and 20"}
    if item in EXTRAS:
        price = EXTRAS[item]
    elif item in PIZZAS:
        if size not in PIZZA_PRICES:
            return {"error": f"ask the caller for a size: {', '.join(PIZZA_PRICES)}"}
        price = PIZZA_PRICES[size]
    else:
        return {"error": f"not on the menu; we have {', '.join(PIZZAS + tuple(EXTRAS))}"}
    order = context.state.setdefault("order", [])
    order.append({"item": item, "size": size, "quantity": quantity, "price": price})
    return read_order(context=context)


def remove_from_order(item: str, *, context: ToolContext) -> dict[str, Any]:
    order = context.state.get("order", [])
    for index, line in enumerate(order):
        if line["item"] == item.strip().lower():
            del order[index]
            return read_order(context=context)
    return {"error": f"{item} is not in the order"}


def read_order(*, context: ToolContext) -> dict[str, Any]:
    order = context.state.get("order", [])
    total = sum(line["price"] * line["quantity"] for line in order)
    return {"items": order, "total_dollars": round(total, 2)}


def place_order(name: str, delivery: bool = False, address: str = "", *, context: ToolContext) -> dict[str, Any]:
    """Confirm the order: the kitchen gets it and the caller hears when it is ready."""
    order = context.state.get("order", [])
    if not order:
        return {"error": "the order is empty"}
    if delivery and not address.strip():
        return {"error": "ask the caller for the delivery address"}
    number = f"T{zlib.crc32(context.call.call_id.encode()) % 9000 + 1000}"
    context.state["placed"] = {"number": number, "name": name, "delivery": bool(delivery)}
    return {"order_number": number, "ready_in_minutes": 45 if delivery else 20, **read_order(context=context)}


# Riverside Bank's demo customers: account number -> (PIN, name, card state).
_CUSTOMERS = {
    "12345678": ("4321", "Alex Morgan", "active"),
    "87654321": ("1111", "Sam Lee", "active"),
}


def verify_customer(account_number: str, pin: str, *, context: ToolContext) -> dict[str, Any]:
    """Check the account number and PIN; on success the customer is in state for every agent."""
    digits = "".join(ch for ch in str(account_number) if ch.isdigit())
    record = _CUSTOMERS.get(digits)
    attempts = context.state.get("failed_attempts", 0)
    if attempts >= 3:
        return {"verified": False, "error": "too many attempts: offer to transfer to a colleague"}
    if record is None or record[0] != "".join(ch for ch in str(pin) if ch.isdigit()):
        context.state["failed_attempts"] = attempts + 1
        return {"verified": False, "attempts_left": 2 - attempts}
    context.state["customer"] = {"account": digits, "name": record[1], "card": record[2]}
    return {"verified": True, "name": record[1]}


def block_card(*, context: ToolContext) -> dict[str, Any]:
    customer = context.state.get("customer")
    if not customer:
        return {"error": "the caller is not verified"}
    customer["card"] = "blocked"
    return {"blocked": True, "replacement_arrives_in_days": 5}
