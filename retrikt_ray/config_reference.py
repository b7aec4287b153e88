"""docs/configuration.md, generated from the job spec's pydantic fields so that it cannot drift:

    .venv/bin/python -m retrikt_ray.config_reference > docs/configuration.md

tests/test_config.py fails when the committed file differs from what this writes.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel

from .config import JobSpec

HEADER = """# Configuration reference

Every field of a job spec (`jobs/*.yaml`), section by section, with its type, default and meaning. Generated
from `retrikt_ray/config.py` by `python -m retrikt_ray.config_reference`; do not edit by hand. A field is set in
the YAML file under its section (`student:` then `lr: 5.0e-5`) or on the command line (`--set student.lr=5e-5`).
"""


def type_name(annotation) -> str:
    """A field's type as a reader writes it: `int`, `str | None`, `one of a, b`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(annotation)[0])}" if typing.get_args(annotation) else "list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"section `{annotation.__name__}`"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return "(section)"
    return f"`{json.dumps(default, default=str)}`"


def section_rows(model: type[BaseModel]) -> list[str]:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {type_name(field.annotation)} | {default_text(field)} | {description} |")
    return rows


def reference() -> str:
    lines = [HEADER]
    top = [name for name, field in JobSpec.model_fields.items() if not _is_section(field.annotation)]
    if top:
        lines += ["## Top level", "", *section_rows_subset(JobSpec, top), ""]
    for name, field in JobSpec.model_fields.items():
        if not _is_section(field.annotation):
            continue
        lines += section_text(name, field.annotation, "##")
    return "\n".join(lines).rstrip() + "\n"


def section_text(path: str, model: type[BaseModel], heading: str) -> list[str]:
    """A section's heading, docstring and rows, then each section nested in it (`serve.capture`) the same way."""
    lines = [f"{heading} `{path}`", "", (model.__doc__ or "").strip(), "", *section_rows(model), ""]
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            lines += section_text(f"{path}.{name}", field.annotation, heading + "#")
    return lines


def section_rows_subset(model: type[BaseModel], names: list[str]) -> list[str]:
    rows = section_rows(model)
    return rows[:2] + [row for row in rows[2:] if row.split("`")[1] in names]


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


if __name__ == "__main__":
    print(reference(), end="")
