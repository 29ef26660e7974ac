"""Fixtures shared by the CLI tests."""

import json

import pytest

from autoplan.cli import main


@pytest.fixture
def plan_file(tmp_path, request):
    """The test module's PLAN (a dict) written as a plan file."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(request.module.PLAN))
    return path


@pytest.fixture
def run_cli(capsys):
    """run_cli(argv) -> (exit code, stdout, stderr) of `autoplan ARGV` run in this process."""
    def run(argv):
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err
    return run
