"""A plan as a file: PlanFile (the plan, what it was made for, its estimate) and the parsers that read a
plan from JSON text, bare or in a PlanFile."""

from __future__ import annotations

from pydantic import Field, ValidationError

from autoplan.errors import InvalidInputError
from autoplan.safe_io import parse_json
from autoplan.schema.base import SCHEMA_VERSION, _Noun, one_line
from autoplan.schema.plan import Plan
from autoplan.schema.result import Estimate


class PlanFile(_Noun):
    """A plan as `autoplan search --out` writes it: the plan, what it was made for, and its estimate."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    plan: Plan = Field(description="The plan to run.")
    model: str = Field(description="Model (built-in name or model.py path) the plan was made for.")
    seq_len: int = Field(description="Sequence length it was planned at.")
    cluster: str = Field(description="Cluster preset or file it was planned on.")
    gpu: str = Field(description="GPU model of that cluster.")
    gpus: int = Field(description="GPUs it was planned for.")
    estimate: Estimate | None = Field(None, description="The cost model's estimate at planning time.")
    command: str | None = Field(None, description="The command that made it.")


def parse_plan_file(text: str, source: str = "plan") -> tuple[Plan, PlanFile | None]:
    """A Plan from JSON text (a bare plan or a PlanFile), or InvalidInputError naming what is wrong."""
    data = parse_json(text, source)
    try:
        if isinstance(data, dict) and isinstance(data.get("plan"), dict):
            if {"model", "gpus"} <= data.keys():
                origin = PlanFile.model_validate(data)
                return origin.plan, origin
            return Plan.model_validate(data["plan"]), None
        return Plan.model_validate(data), None
    except ValidationError as err:
        raise InvalidInputError(f"{source}: {one_line(err)}") from None


def parse_plan(text: str, source: str = "plan") -> Plan:
    """A Plan from JSON text (a bare plan or a plan file), or InvalidInputError with one line."""
    return parse_plan_file(text, source)[0]
