"""``tools`` and ``tool_choice``: a function call made by holding the answer to the function's argument schema.

InternVL 1.5 has no trained tool-call format, so the model is never left to decide whether to call a tool:
  - ``tool_choice`` "none": the tools are ignored and the model answers in text;
  - a named function (``{"type": "function", "function": {"name": ...}}``), or "required" with one tool: the
    answer is that function's arguments, held to its ``parameters`` schema;
  - "required" with several tools: the answer is ``{"name": ..., "arguments": {...}}``, held to a schema that
    allows exactly one of them with its own arguments;
  - "auto" (OpenAI's default when tools are given) is refused with a 400 saying why.
The functions (name, description, parameter schema) are described to the model after the system message, so a
real model knows what it is filling in. The answer comes back as ``tool_calls`` with finish_reason "tool_calls".
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .errors import bad_request

__all__ = ["ToolPlan", "plan_tools", "tool_calls", "render_tool_calls"]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    schema: dict  # the JSON schema the answer is held to
    name: str | None  # the function called, when known before the answer (else the answer names it)
    instruction: str  # what the model is told, after the system message


def _functions(tools) -> dict[str, dict]:
    if not isinstance(tools, list) or not tools:
        raise bad_request("'tools' must be a non-empty list of function tools", "tools")
    functions = {}
    for k, tool in enumerate(tools):  # errors name "tools" as the param and the entry in the message
        where = f"tools[{k}]"
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise bad_request(f"{where}: a tool must be {{'type': 'function', 'function': {{...}}}}", "tools")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad_request(
                f"{where}.function.name: 1-64 letters, digits, '_' or '-', got {name!r:.80}", "tools"
            )
        if name in functions:
            raise bad_request(f"{where}.function.name: two tools are named {name!r}", "tools")
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise bad_request(f"{where}.function.parameters must be a JSON schema object", "tools")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise bad_request(f"{where}.function.description must be a string", "tools")
        functions[name] = {"name": name, "description": description, "parameters": parameters}
    return functions


def _describe(functions: list[dict]) -> str:
    return "\n".join(
        f"- {f['name']}: {f['description'] or '(no description)'}; parameters (JSON schema): "
        f"{json.dumps(f['parameters'], ensure_ascii=False)}"
        for f in functions
    )


def plan_tools(body: dict) -> ToolPlan | None:
    """The plan of a request's tools and tool_choice, or None when the answer is plain text."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return None
    functions = _functions(tools)
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        raise bad_request(
            "tool_choice 'auto' is not supported: InternVL 1.5 has no trained tool-call format, so pyvl never "
            "lets the model decide whether to call a tool; pass tool_choice 'required', a named function "
            "({'type': 'function', 'function': {'name': ...}}) or 'none'",
            "tool_choice",
            "unsupported_parameter",
        )
    if choice == "required" and len(functions) > 1:
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions.values()
        ]
        instruction = (
            "Call exactly one of these functions. Reply with only a JSON object "
            '{"name": <function name>, "arguments": <its arguments>}.\n' + _describe(list(functions.values()))
        )
        return ToolPlan({"anyOf": options}, None, instruction)
    if choice == "required":
        (name,) = functions
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
    ):
        name = choice["function"].get("name")
        if name not in functions:
            raise bad_request(
                f"tool_choice names {name!r}, which is not among the tools"[:200], "tool_choice"
            )
    else:
        raise bad_request(
            "'tool_choice' must be 'none', 'required', 'auto' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    function = functions[name]
    instruction = f"Call the function {name}. Reply with only its arguments as a JSON object.\n" + _describe(
        [function]
    )
    return ToolPlan(function["parameters"], name, instruction)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(plan: ToolPlan, text: str) -> list[dict]:
    """The answer as OpenAI's ``tool_calls`` (the arguments as the JSON text the model wrote; a truncated answer
    keeps its partial text)."""
    name, arguments = plan.name, text
    if name is None:
        try:
            call = json.loads(text)
            name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
        except (json.JSONDecodeError, KeyError, TypeError):  # cut short by max_tokens: no name to give
            name = ""
    return [{"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}]


def render_tool_calls(calls, param: str) -> str:
    """An assistant message's earlier ``tool_calls`` as the text the model sees in the history."""
    if not isinstance(calls, list):
        raise bad_request("'tool_calls' must be a list", param)
    lines = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request("a tool call needs a 'function' with a 'name'", f"{param}[{k}]")
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):
            raise bad_request(
                "a tool call's 'arguments' is a JSON string", f"{param}[{k}].function.arguments"
            )
        lines.append(json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False))
    return "\n".join(lines)
