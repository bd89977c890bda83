"""The README's walkthrough ("A first egress policy"), run as written: every command of its
console blocks, in order, on a lab of its own — on the kube lab as the README shows it, and
on the file lab with `--datastore file` — and each command's output must be what the README
prints under it.

In the README's console blocks a line starting with `$ ` is a command (a here-document
runs on to its terminator), the lines after it are its output; `…` inside a line stands for
any text, and a line that is only `…` for any number of lines. Commands that only look
(`lab get`, `lab exec`) are repeated until their output matches, for at most
`SETTLE_SECONDS` (the README says a change takes effect "within a second or two"); every
other command runs once and must succeed with the output shown. Lines such as
`. .venv/bin/activate` carry over to the commands after them, as in one shell.
"""

import os
import re
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import lab, lab_named

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BEGIN, END = "<!-- walkthrough begin -->", "<!-- walkthrough end -->"
SETTLE_SECONDS = 30
LOOKING = re.compile(r"^meshgress lab (get|exec) ")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def walkthrough_steps(text: str) -> list[Step]:
    """The commands of the walkthrough's console blocks with the output shown for each."""
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    steps: list[Step] = []
    for block in re.findall(r"^```console\n(.*?)^```$", section, re.S | re.M):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.startswith("$ "):
                assert steps, f"output before any command: {line!r}"
                steps[-1].expected.append(line)
                continue
            command = line[2:]
            heredoc = re.search(r"<<'?(\w+)'?", command)
            if heredoc:
                body = []
                while lines[i] != heredoc.group(1):
                    body.append(lines[i])
                    i += 1
                i += 1
                command = "\n".join([command, *body, heredoc.group(1)])
            steps.append(Step(command))
    return steps


def _line_pattern(line: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in line.split("…")) + r"\Z")


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` is what `expected` shows (`…` lines and parts are wildcards); a
    command shown without output may print anything."""
    return not expected or _lines_match(expected, actual)


def _lines_match(expected: list[str], actual: list[str]) -> bool:
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head == "…":
        return any(_lines_match(rest, actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and bool(_line_pattern(head).match(actual[0].rstrip())) and \
        _lines_match(rest, actual[1:])


def test_the_walkthrough_parses_as_the_readme_means_it():
    steps = walkthrough_steps(README.read_text())
    commands = [s.command.split("\n")[0] for s in steps]
    assert commands[0] == ". .venv/bin/activate"
    assert commands[1].startswith("meshgress lab up --datastore kube")
    assert commands[-1] == "meshgress lab down"
    apply = next(s for s in steps if s.command.startswith("meshgress lab apply"))
    assert apply.command.endswith("\nEOF") and "kind: EgressPolicy" in apply.command
    assert output_matches(["a …", "…", "z"], ["a b", "x", "y", "z"])
    assert not output_matches(["a …"], ["a b", "extra"])


@pytest.mark.parametrize("datastore", ["kube", "file"])
def test_the_readme_walkthrough_reaches_its_stated_outcome(datastore):
    name = lab_named("r" + secrets.token_hex(3), datastore)
    env = {**os.environ, "MESHGRESS_LAB": str(name)}
    prelude: list[str] = []
    try:
        for step in walkthrough_steps(README.read_text()):
            command = step.command.replace("--datastore kube", f"--datastore {datastore}")
            if command.startswith((". ", "source ", "export ")):
                prelude.append(command)
                continue
            script = "\n".join([*prelude, command])
            deadline = time.monotonic() + (SETTLE_SECONDS if LOOKING.match(command) else 0)
            while True:
                proc = subprocess.run(["bash", "-e", "-c", script], cwd=REPO, env=env,
                                      capture_output=True, text=True, timeout=600)
                shown = proc.stdout.splitlines()
                if proc.returncode == 0 and output_matches(step.expected, shown):
                    break
                assert time.monotonic() < deadline, (
                    f"`{command}` exited {proc.returncode}; the README shows:\n"
                    + "\n".join(step.expected) + f"\nit printed:\n{proc.stdout}{proc.stderr}")
                time.sleep(0.5)
    finally:
        lab(name, "down", check=False)
