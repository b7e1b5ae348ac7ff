"""Reading agent and scenario YAML files, with errors that name the file, the place and the fix.

The models are strict (unknown keys are errors): a silently ignored typo is the worst failure on a
phone line. Error locations read like the YAML ("agents[1] (cards).tools[0] (lookup).python"),
and an unknown key lists the keys allowed there. A model's own check may name the key at fault
with a `key` attribute on its ValueError (see tools.ToolError).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class AgentConfigError(ValueError):
    """An agent or scenario file could not be found, parsed or validated."""


def read_yaml_mapping(path: Path, what: str = "script") -> dict[str, Any]:
    """The top-level mapping of a YAML file; any problem raises AgentConfigError naming the file."""
    data = _read_yaml(path, what)
    if data is None:
        raise AgentConfigError(f"{path}: {what} is empty")
    if not isinstance(data, dict):
        raise AgentConfigError(f"{path}: top level must be a mapping (name:, ...), got {type(data).__name__}")
    return data


def _read_yaml(path: Path, what: str) -> Any:
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AgentConfigError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"{path}: cannot read {what}: {exc}") from None
    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as exc:
        where = _yaml_position(exc)
        raise AgentConfigError(f"{path}: YAML syntax error{where}: {_yaml_problem(exc)}") from None


def _yaml_position(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return ""
    return f" at line {mark.line + 1}, column {mark.column + 1}"  # marks are 0-based


def _yaml_problem(exc: yaml.YAMLError) -> str:
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    text = ", ".join(p for p in parts if p)
    return text or str(exc)


def describe_validation_error(path: Path, data: dict[str, Any], exc: ValidationError, root: type[BaseModel]) -> str:
    problems = [_describe_one_error(data, err, root) for err in exc.errors()]
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    return f"{path}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _describe_one_error(data: dict[str, Any], err: Any, root: type[BaseModel]) -> str:
    raw = tuple(err["loc"])
    loc, _ = _walk(root, raw)
    where = _describe_location(data, loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _as_model(_walk(root, raw[:-1])[1])
        allowed = f" (allowed keys: {', '.join(model.model_fields)})" if model is not None else ""
        where = _describe_location(data, loc[:-1])
        problem = f"unknown key {loc[-1]!r}{allowed}"
        return f"{where}: {problem}" if where else problem
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "value_error":
        cause = err["ctx"]["error"]
        message = str(cause)  # our own message, without pydantic's prefix
        key = getattr(cause, "key", None)  # a model's check that names the key at fault
        if isinstance(key, str) and key:
            where = f"{where}.{key}" if where else key
    else:
        message = err["msg"]
    return f"{where}: {message}" if where else message


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """Follow a raw pydantic error location through the models: the location as the YAML reads
    (without the union tags pydantic inserts: 'agents', 0, 'llm', ...) and the type reached."""
    path: list[Any] = []
    annotation: Any = root
    for part in loc:
        members = _union_members(annotation)
        if members and isinstance(part, str) and part in members:
            annotation = members[part]  # the tag picks the member
            continue
        path.append(part)
        annotation = _child_annotation(annotation, part)
    return tuple(path), annotation


def _as_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_optional(annotation)
    if _union_members(annotation):
        return None  # which member is ambiguous here: do not guess the allowed keys
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _child_annotation(annotation: Any, part: Any) -> Any:
    annotation = _strip_optional(annotation)
    if isinstance(part, int):
        args = typing.get_args(annotation)
        return args[0] if args else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(part)
        return field.annotation if field is not None else None
    return None


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """A union of models told apart by their `kind` default: tag -> model."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return {}
    members: dict[str, type[BaseModel]] = {}
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "kind" in arg.model_fields:
            members[str(arg.model_fields["kind"].default)] = arg
    return members


def _describe_location(data: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """("agents", 1, "intents", 2, "reply") -> "agents[1] (cards).intents[2] (hours).reply"."""
    text = ""
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str) and node["name"]:
                text += f" ({node['name']})"
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text
