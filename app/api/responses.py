"""JSON answers that can carry whatever a reply source yielded."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class SafeJSONResponse(JSONResponse):
    """A reply may hold a lone surrogate (a plug-in's text): UTF-8 cannot carry it, JSON's
    `\\uXXXX` escape can, and gives clients the very string the stream gave them."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode()
