"""The OpenAPI document as the server answers: a validation error is 400 `ErrorBody`.

FastAPI documents a `422 HTTPValidationError` on every route that takes parameters or a body;
threadgate's handler (api/__init__.py) answers those with 400 and its one error body instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .schemas import ErrorBody

_FASTAPI_ONLY = ("HTTPValidationError", "ValidationError")


def document_errors(app: FastAPI) -> None:
    """Replace `app.openapi` by one whose routes say 400 ErrorBody where FastAPI says 422."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = fix(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def fix(schema: dict[str, Any]) -> dict[str, Any]:
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is None:
                continue
            responses.setdefault(
                "400",
                {
                    "description": "Invalid request: the message names each field and rule",
                    "content": {"application/json": {"schema": error_ref}},
                },
            )
    text = repr(schema.get("paths", {}))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorBody" not in components:
        body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ErrorBody"] = body
    for name in _FASTAPI_ONLY:
        if f"#/components/schemas/{name}'" not in text:
            components.pop(name, None)
    return schema
