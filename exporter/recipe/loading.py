"""Reading a recipe: YAML loading, CLI overrides, friendly errors that name the key and the fix, the
recipe dumped back as YAML, and every field explained (`scalpel check --explain`)."""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

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


def _read_yaml(path: Path) -> tuple[str, Any]:
    """The file's text and what it parses to."""
    if not path.is_file():
        raise RecipeError(
            f"{path}: recipe file not found; pass the path of a YAML recipe (see recipes/)"
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return text, data if data is not None else {}


def read_recipe(
    path: Union[str, Path], overrides: Optional[dict[str, Any]] = None, *, check_files: bool = True
) -> tuple[Recipe, str]:
    """Read and validate a YAML recipe, `overrides` mapping dotted keys to values (CLI flags); and
    the text a run records as its recipe: the file as written, or with overrides the file's
    settings with them applied (a recipe that runs again as this run did; the file's comments are
    lost), the flags named in its first line."""
    path = Path(path)
    text, data = _read_yaml(path)
    data = with_overrides(data, overrides)
    recipe = parse_recipe(data, source=str(path), base_dir=path.parent, check_files=check_files)
    if overrides:
        flags = " ".join(f"--set {k}={_flow(v)}" for k, v in overrides.items())
        text = f"# {path.name} {flags}\n" + yaml.safe_dump(data, sort_keys=False)
    return recipe, text


def load_recipe(
    path: Union[str, Path], overrides: Optional[dict[str, Any]] = None, *, check_files: bool = True
) -> Recipe:
    """Read and validate a YAML recipe; `overrides` maps dotted keys to values (CLI flags)."""
    return read_recipe(path, overrides, check_files=check_files)[0]


def _flow(value: Any) -> str:
    """`value` as one line of YAML (as `--set` reads it back)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
    return text.removesuffix("\n...\n").strip()


def with_overrides(data: Any, overrides: Optional[dict[str, Any]]) -> Any:
    """A copy of a recipe mapping with each dotted key of `overrides` set (its sections made where
    missing); anything but a mapping is returned as it is, for validation to name."""
    if not overrides or not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[last] = value
    return data


def parse_overrides(items: Optional[Iterable[str]]) -> dict[str, Any]:
    """`KEY=VALUE` strings (`--set` on the command line) as dotted keys to values, each value read
    as YAML (`0`, `false`, `[0.1, 0.2]`, `{path: x}`; anything else stays a string)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(
                f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. --set eval.samples=0 or "
                "--set 'intervention.alpha=[0.1, 0.2]' (`scalpel check --explain` lists the keys)"
            )
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise RecipeError(
                f"--set {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); "
                "quote the whole flag, e.g. --set 'intervention.alpha=[0.1, 0.2]'"
            ) from None
    return out


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
