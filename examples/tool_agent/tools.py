"""The agent's tools, run in-process: a weather lookup (a fixed table) and a calculator."""

from __future__ import annotations

import ast
import operator
from typing import Any

# Offered to the model in every request (the OpenAI `tools` format).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression: numbers, + - * / % ** and ( ).",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
]

WEATHER = {
    "Paris": {"temp_c": 18, "sky": "cloudy"},
    "Lima": {"temp_c": 22, "sky": "clear"},
    "Oslo": {"temp_c": 4, "sky": "snow"},
}

OPERATORS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def run_tool(name: str, arguments: Any) -> Any:
    """A tool's result, a JSON value. A bad call gives an `error` result for the model to
    read (it may correct itself), not a failure of the run."""
    if not isinstance(arguments, dict):
        return {"error": "the arguments must be a JSON object"}
    if name == "get_weather":
        city = str(arguments.get("city", ""))
        if city not in WEATHER:
            return {"error": f"no weather for {city!r}"}
        return {"city": city, **WEATHER[city]}
    if name == "calculate":
        expression = str(arguments.get("expression", ""))
        try:
            return {
                "expression": expression,
                "value": _evaluate(ast.parse(expression, mode="eval")),
            }
        except (SyntaxError, ValueError, ArithmeticError) as exc:
            return {"error": f"cannot calculate {expression!r}: {exc}"}
    return {"error": f"no tool named {name!r}"}


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponents above 64 are refused")
        return OPERATORS[type(node.op)](left, right)
    raise ValueError("only numbers, + - * / % ** and parentheses")
