"""Reading a recipe: YAML loading, CLI overrides, friendly errors that name the key and the fix, the
recipe dumped back as YAML, and every field explained (`scalpel check --explain`)."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from .schema import Recipe


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key path and the fix."""


def _section_class(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model that owns the last key of `loc`, to list what is allowed there."""
    cls: Any = Recipe
    parts = [p for p in loc[:-1] if isinstance(p, str)]
    while parts:
        part = parts.pop(0)
        field = (
            cls.model_fields.get(part)
            if isinstance(cls, type) and issubclass(cls, BaseModel)
            else None
        )
        if field is None:
            return None
        ann = field.annotation
        members = [
            c
            for c in (typing.get_args(ann) or [ann])
            if isinstance(c, type) and issubclass(c, BaseModel)
        ]
        # a tagged union (`method`): the next part is the member's tag
        if len(members) > 1 and parts:
            tag = parts.pop(0)
            members = [
                c for c in members if tag in typing.get_args(c.model_fields["name"].annotation)
            ]
        cls = members[0] if members else None
        if cls is None:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _section_class(loc)
        allowed = sorted(owner.model_fields) if owner else []
        return (
            f"{key}: unknown key; {_did_you_mean(str(loc[-1]), allowed)}allowed here: "
            f"{', '.join(allowed)}"
        )
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "literal_error":
        expected = [
            s.strip(" '")
            for s in str(err.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")
        ]
        return (
            f"{key}: {value!r} is not allowed; {_did_you_mean(str(value), expected)}allowed: "
            f"{', '.join(expected)}"
        )
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = [
            typing.get_args(c.model_fields["name"].annotation)[0]
            for c in typing.get_args(Recipe.model_fields["method"].annotation)
        ]
        if kind == "union_tag_not_found":
            return f"{key}: needs a name, one of: {', '.join(tags)}"
        got = err.get("ctx", {}).get("tag", "")
        return (
            f"{key}: name {got!r} is not a method; {_did_you_mean(str(got), tags)}use one of: "
            f"{', '.join(tags)}"
        )
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(value, dict) else f"got {value!r}; "
    return f"{key}: {shown}{msg}"


def parse_recipe(
    data: Any,
    *,
    source: str = "<recipe>",
    base_dir: Union[str, Path] = ".",
    check_files: bool = True,
) -> Recipe:
    """Validate an already-parsed recipe mapping, raising RecipeError with every problem listed.
    `check_files=False` accepts paths that do not exist yet (a plan for another machine)."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe must be a mapping of sections (model, data, ...), got "
            f"{type(data).__name__}"
        )
    try:
        return Recipe.model_validate(
            data, context={"base_dir": str(base_dir), "check_files": check_files}
        )
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise RecipeError(f"{source}: invalid recipe\n  " + "\n  ".join(lines)) from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, but a key written twice in one mapping is an error: plain YAML keeps the
    last one, so a second `eval:` section would silently drop every setting of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key!r} is written twice (first at line {seen[key] + 1}); merge the two into "
                    "one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(
    path: Union[str, Path], overrides: Optional[dict[str, Any]] = None, *, check_files: bool = True
) -> Recipe:
    """Read and validate a YAML recipe; `overrides` maps dotted keys to values (CLI flags)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"{path}: recipe file not found; pass the path of a YAML recipe (see recipes/)"
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    data = data if data is not None else {}
    for dotted, value in (overrides or {}).items():
        if isinstance(data, dict):
            _set_dotted(data, dotted, value)
    return parse_recipe(data, source=str(path), base_dir=path.parent, check_files=check_files)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def recipe_yaml(recipe: Recipe) -> str:
    """The validated recipe as YAML (defaults filled in), for reports and cards."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _models(annotation) -> list[type[BaseModel]]:
    return [
        c
        for c in (typing.get_args(annotation) or [annotation])
        if isinstance(c, type) and issubclass(c, BaseModel)
    ]


def explain(cls: type[BaseModel] = Recipe, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, default, description) of every field, sections first described then walked into
    (a tagged union such as `method` lists each member under its name)."""
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        if name == "name" and prefix.endswith("]."):  # a union member's tag, already in its key
            continue
        members = _models(field.annotation)
        if members:
            yield (
                key,
                "",
                field.description or (members[0].__doc__ or "").split("\n\n")[0].replace("\n", " "),
            )
            for member in members:
                tag = member.model_fields.get("name")
                sub = (
                    f"{key}[name={typing.get_args(tag.annotation)[0]}]."
                    if len(members) > 1 and tag
                    else f"{key}."
                )
                if len(members) > 1:
                    yield sub[:-1], "", (member.__doc__ or "").split("\n\n")[0].replace("\n", " ")
                yield from explain(member, sub)
            continue
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        yield key, default, field.description or ""
