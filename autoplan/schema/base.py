"""What every noun shares: the base class (frozen, `extra="forbid"`, a schema version, load and save as
JSON), the bounds that keep enumeration fast, and `one_line` for a validation error a user reads."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from autoplan.errors import InvalidInputError
from autoplan.safe_io import parse_json, read_text, write_text

SCHEMA_VERSION = 1
MAX_GPUS = 2**20          # bounds that keep every enumeration fast; far above any job run today
MAX_GLOBAL_BATCH = 2**30


class _Noun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # values: change with model_copy(update=...)

    @field_validator("schema_version", check_fields=False)
    @classmethod
    def _this_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value}: this autoplan reads version {SCHEMA_VERSION}")
        return value

    @classmethod
    def load(cls, path: str | Path):
        """Read a JSON file of this noun; a missing or malformed file raises InvalidInputError."""
        text = read_text(path, f"{cls.__name__} file")
        parse_json(text, str(path))  # one-line errors for bad JSON, NaN/Infinity, deep nesting
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise InvalidInputError(f"{path}: {one_line(err)}") from None

    def save(self, path: str | Path, *, force: bool = True) -> None:
        """Write as JSON, atomically and never through a link (safe_io.write_text); an existing file is
        replaced only with `force` (the CLI passes its --force)."""
        write_text(path, self.model_dump_json(indent=2) + "\n", force=force)


_FINITE = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inputs: no NaN or Infinity


def one_line(err: ValidationError) -> str:
    """The first problem pydantic found, as one line a user can read ('tp: tp=3 does not divide ...')."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", str(err)).removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"
