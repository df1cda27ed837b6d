"""The documentation cannot drift from the code: every command in a fenced block of README.md and docs/*.md names a
module, script or test path that exists and flags that its ``--help`` lists, and every relative link of the
markdown files resolves to a file (and its ``#anchor`` to a heading of that file, by GitHub's rules)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK_DOCS = [*COMMAND_DOCS, REPO / "CHANGELOG.md", REPO / "bench" / "README.md"]
PROJECT_PACKAGES = {"kernels", "mer", "carn", "camhg"}
EXTERNAL_MODULES = {"pip"}  # other tools' modules: their flags are theirs to document
PYTEST_VALUE_OPTIONS = {"-m", "-k", "-n", "-p", "-o", "-c", "--benchmark-json", "--benchmark-columns",
                        "--benchmark-sort", "--benchmark-group-by", "--basetemp", "--rootdir"}
COMMAND_START = re.compile(r"^\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:python3?|pytest|bash|torchrun|pip)\b")
FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


class Command(NamedTuple):
    doc: Path
    line: str
    kind: str  # "module", "pytest", "bash"
    target: str  # the module, or the script
    arguments: tuple


# ---------------------------------------------------------------------------------------------------- extraction
def fenced_lines(text: str) -> Iterator[str]:
    """The lines inside the fenced code blocks of a markdown text, continuation lines (``\\``) joined."""
    inside, pending = False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = line.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""


def commands_of(doc: Path, text: str) -> Iterator[Command]:
    """Every ``python -m M ...``, ``pytest ...``, ``bash X ...`` (and ``torchrun ... -m M ...``) of the fenced
    blocks, split at ``&&``, ``;`` and ``|``, environment assignments in front dropped."""
    for line in fenced_lines(text):
        if not COMMAND_START.match(line):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as error:
            raise AssertionError(f"{doc.name}: cannot parse {line!r}: {error}") from None
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token not in ("&&", ";", "|", "||"):
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
                segment.pop(0)
            command = _command(doc, line, segment)
            if command is not None:
                yield command
            segment = []


def _command(doc: Path, line: str, tokens: list[str]) -> Command | None:
    if not tokens:
        return None
    program, rest = tokens[0], tokens[1:]
    if program in ("python", "python3", "torchrun") and "-m" in rest:
        at = rest.index("-m")
        module, arguments = rest[at + 1], rest[at + 2:]
        if module == "pytest":
            return Command(doc, line, "pytest", "pytest", tuple(arguments))
        return Command(doc, line, "module", module, tuple(arguments))
    if program == "pytest":
        return Command(doc, line, "pytest", "pytest", tuple(rest))
    if program == "bash" and rest:
        return Command(doc, line, "bash", rest[0], tuple(rest[1:]))
    return None


def flags_of(arguments: tuple) -> set[str]:
    return {argument.split("=", 1)[0] for argument in arguments if argument.startswith("--") and len(argument) > 2}


def pytest_paths(arguments: tuple) -> list[str]:
    paths, previous = [], ""
    for argument in arguments:
        if not argument.startswith("-") and previous not in PYTEST_VALUE_OPTIONS:
            paths.append(argument.split("::", 1)[0])
        previous = argument
    return paths


def is_project_module(module: str) -> bool:
    return module.split(".", 1)[0] in PROJECT_PACKAGES


_HELP_SCRIPT = r"""
import contextlib, io, json, os, runpy, sys

def no_exec(*args, **kwargs):
    raise RuntimeError("the module re-executes itself")

os.execv = os.execve = no_exec  # a module that restarts itself (kernels.tools.counts) must not replace this process
helps = {}
for module in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    except BaseException as error:
        out.write(f"\n<--help failed: {type(error).__name__}: {error}>")
    helps[module] = out.getvalue()
sys.stdout.write(json.dumps(helps))
"""


def collect_help(modules: list[str]) -> dict[str, str]:
    """``python -m M --help`` of every module, in one interpreter (one import of torch for all)."""
    if not modules:
        return {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TRITON_INTERPRET": "1"}  # as the test command sets it (kernels.tools.counts needs the interpreter)
    result = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, *modules], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def command_problems(commands: list[Command], help_of: Callable[[str], str]) -> list[str]:
    """What is wrong with each command: a module that does not exist, a flag its --help does not list, a script or
    test path that is not in the repository."""
    problems = []
    for command in commands:
        where = command.doc.name
        if command.kind == "module":
            if importlib.util.find_spec(command.target) is None:
                problems.append(f"{where}: no module {command.target} ({command.line})")
                continue
            if command.target in EXTERNAL_MODULES or not is_project_module(command.target):
                continue
            shown = help_of(command.target)
            for flag in sorted(flags_of(command.arguments)):
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown):
                    problems.append(f"{where}: python -m {command.target} has no {flag} ({command.line})")
        elif command.kind == "pytest":
            for path in pytest_paths(command.arguments):
                if not (REPO / path).exists():
                    problems.append(f"{where}: pytest path {path} does not exist ({command.line})")
        elif command.kind == "bash" and not (REPO / command.target).is_file():
            problems.append(f"{where}: no script {command.target} ({command.line})")
    return problems


# ---------------------------------------------------------------------------------------------------------- links
def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation (backticks, dots, parentheses...) removed, spaces
    to hyphens; letters, digits, ``_`` and ``-`` kept."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(text: str) -> set[str]:
    anchors, seen = set(), {}
    for line in _outside_fences(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return anchors


def _outside_fences(text: str) -> Iterator[str]:
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield line


def link_problems(doc: Path) -> list[str]:
    problems = []
    for line in _outside_fences(doc.read_text(encoding="utf-8")):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                problems.append(f"{doc.name}: link to {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors_of(file.read_text(encoding="utf-8")):
                problems.append(f"{doc.name}: link to {target}: no heading #{anchor} in {file.name}")
    return problems


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def documented_commands() -> list[Command]:
    return [command for doc in COMMAND_DOCS for command in commands_of(doc, doc.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def help_texts(documented_commands) -> dict[str, str]:
    modules = {c.target for c in documented_commands if c.kind == "module" and is_project_module(c.target)}
    return collect_help(sorted(modules | {"carn.train"}))


def test_docs_hold_commands_of_every_kind(documented_commands):
    kinds = {command.kind for command in documented_commands}
    assert kinds == {"module", "pytest", "bash"}, kinds
    targets = {command.target for command in documented_commands}
    assert {"camhg.train", "carn.train", "kernels.tools.report", "bench/gpu.sh"} <= targets


def test_every_documented_command_exists_with_its_flags(documented_commands, help_texts):
    assert command_problems(documented_commands, help_texts.__getitem__) == []


@pytest.mark.parametrize("doc", LINK_DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    assert link_problems(doc) == []


def test_readme_holds_the_two_set_up_commands():
    """``.ci/run`` runs README's test line; the main job's line is the other set-up command."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert "pip install torch==2.13.0 -e . && python -m camhg.train" in lines
    assert any(line.startswith("pip install ") and "-m pytest tests" in line for line in lines)


def test_the_checker_finds_what_is_wrong(tmp_path, help_texts):
    """A fake doc with a flag, a module, a script, a test path, a file and an anchor that do not exist: each is
    reported; the same doc made right reports nothing."""
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "fake.md"
    doc.write_text(
        "# Fake page\n\n## A `section` (here)\n\n"
        "```bash\n"
        "OMP_NUM_THREADS=1 python -m carn.train --epochs 1 1 --no-such-flag  # a comment --not-a-flag\n"
        "python -m carn.no_such_module --help\n"
        "pip install x && bash bench/no_such_script.sh\n"
        "python -m pytest tests/no_such_test.py -k name\n"
        "python -m carn.train \\\n    --seed 1 --another-missing-flag\n"
        "```\n\n"
        "[gone](no_such_file.md), [here](#a-section-here), [bad](#no-such-heading), [web](https://example.com)\n",
        encoding="utf-8")
    problems = command_problems(list(commands_of(doc, doc.read_text())), help_texts.__getitem__)
    assert len(problems) == 5, problems
    for expected in ("no --no-such-flag", "no module carn.no_such_module", "no script bench/no_such_script.sh",
                     "tests/no_such_test.py does not exist", "no --another-missing-flag"):
        assert sum(expected in problem for problem in problems) == 1, (expected, problems)
    named = " ".join(problem.split(" (")[0] for problem in problems)
    assert "--epochs" not in named and "--seed" not in named and "--not-a-flag" not in named, problems
    links = link_problems(doc)
    assert len(links) == 2 and "no_such_file.md: no such file" in links[0] and "#no-such-heading" in links[1], links

    doc.write_text("# Fake\n\n```bash\npython -m carn.train --epochs 1 1 --threads 2\nbash bench/gpu.sh\n"
                   "pytest tests/test_docs.py\n```\n\n[page](fake.md#fake), [top](#fake)\n", encoding="utf-8")
    assert command_problems(list(commands_of(doc, doc.read_text())), help_texts.__getitem__) == []
    assert link_problems(doc) == []


def test_github_slugs():
    slug = github_slug("Causal entmax-1.5 attention (`kernels/entmax.py`)")
    assert slug == "causal-entmax-15-attention-kernelsentmaxpy"
    assert github_slug("entmax15_attention") == "entmax15_attention"
    assert anchors_of("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
