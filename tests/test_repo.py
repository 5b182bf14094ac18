"""The README's two commands are the project's contract with a fresh machine and with CI."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", head, re.S)


def test_readme_opens_with_exactly_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert all("\n" not in c for c in cmds)
    assert "demo" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    lines = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[-1] == readme_commands()[1]


def _parsers():
    """(name, parser) of ``datacomp-sieve``'s every command and of ``baselines.py``."""
    from datacomp_sieve.cli import add_filter_arguments, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    baselines = argparse.ArgumentParser(prog="baselines.py")
    add_filter_arguments(baselines)
    return [*sub.choices.items(), ("baselines.py", baselines)]


def test_every_flag_has_help_that_says_its_default():
    """--help is where users read the defaults: every flag explains itself, and one whose default is a
    value (not None or off) names it."""
    missing = []
    for name, parser in _parsers():
        for a in parser._actions:
            if not a.option_strings or a.dest == "help":
                continue
            if not a.help:
                missing.append(f"{name} {a.option_strings[0]}: no help")
            elif a.default is not None and a.default is not False and "default" not in a.help:
                missing.append(f"{name} {a.option_strings[0]}: default {a.default!r} not said")
    assert not missing, missing


def _readme_cli_lines():
    """The README's commands of datacomp-sieve and baselines.py, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)\n```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("datacomp-sieve ", "python baselines.py ")):
                yield line


@pytest.mark.parametrize("line", list(_readme_cli_lines()))
def test_the_readme_s_commands_use_flags_that_exist(line):
    """A flag the README shows is one the command has (names drift: --dry-run, --dataset-size, ...)."""
    words = shlex.split(line)
    name = "baselines.py" if words[0] == "python" else words[1]
    parser = dict(_parsers())[name]
    known = {o for a in parser._actions for o in a.option_strings}
    unknown = [w for w in words if w.startswith("--") and w not in known]
    assert not unknown, (line, unknown)
