"""The answers every simulated object route shares: OpenAI's error body, its 404 for a missing
object, and its cursor pages (`{"object": "list", "data", "first_id", "last_id", "has_more"}`)."""

from __future__ import annotations

from typing import Any


def error(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def missing(kind: str, oid: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    return 404, error(f"{kind} with id '{oid}' not found.", "invalid_request_error", param=param)


def page(items: list[dict[str, Any]], params: dict[str, str], default: int, most: int) -> tuple[int, Any]:
    """One cursor page of `items` (oldest first, as made): newest first unless `order=asc`."""
    order = params.get("order", "desc")
    limit = params.get("limit", str(default))
    if order not in ("asc", "desc"):
        return 400, error(
            f"Invalid 'order': '{order}' is not one of 'asc', 'desc'.", "invalid_request_error", param="order"
        )
    if not limit.isdigit() or not 1 <= int(limit) <= most:
        message = f"Invalid 'limit': '{limit}' is not an integer between 1 and {most}."
        return 400, error(message, "invalid_request_error", param="limit")
    ordered = items if order == "asc" else items[::-1]
    after = params.get("after")
    if after is not None:
        at = next((i for i, item in enumerate(ordered) if item["id"] == after), None)
        if at is None:
            return 400, error(f"Invalid 'after': no object with id '{after}'.", "invalid_request_error", param="after")
        ordered = ordered[at + 1 :]
    data = ordered[: int(limit)]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return 200, {
        "object": "list",
        "data": data,
        "first_id": first,
        "last_id": last,
        "has_more": len(ordered) > len(data),
    }
