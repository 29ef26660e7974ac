"""Named errors. Each message carries the numbers; the CLI turns them into one line and an exit code."""


def first_line(err: BaseException) -> str:
    """`Type: first line of the message` of an exception raised by a user's code."""
    lines = str(err).strip().splitlines()
    more = " ..." if len(lines) > 1 else ""
    return f"{type(err).__name__}: {lines[0]}{more}" if lines else type(err).__name__


class AutoplanError(Exception):
    """Base of every error autoplan raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 2


class InvalidInputError(AutoplanError):
    """A file, name or argument the user gave cannot be used (missing, malformed, unknown)."""


class InvalidPlanError(AutoplanError):
    """A plan that contradicts the model or the cluster (tp not dividing heads, dp*tp*pp*cp != GPUs, ...)."""


class ModelLoadError(AutoplanError):
    """A user's model.py is missing, lacks build_model(), or raised while being built."""


class InfeasiblePlanError(AutoplanError):
    """No plan fits in GPU memory; the message names the closest plan and its overflow in bytes."""

    exit_code = 3
