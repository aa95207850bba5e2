"""RFC 9457 problem details: every refusal of the front door says why, with the reason code a
program can act on (``reason``), the attribute at fault (``field``) and, for a batch, each bad
event (``errors``). The codes and what they mean: schemas/api.py (``PROBLEMS``)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from schemas.api import PROBLEMS

MEDIA_TYPE = "application/problem+json"


def problem(
    reason: str,
    detail: str,
    *,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    status, title, _ = PROBLEMS[reason]
    body: dict[str, Any] = {
        "type": f"/problems/{reason}",
        "title": title,
        "status": status,
        "detail": detail,
        "reason": reason,
    }
    if field is not None:
        body["field"] = field
    if errors is not None:
        body["errors"] = errors
    body |= extra
    return Response(orjson.dumps(body), status, headers=headers, media_type=MEDIA_TYPE)
