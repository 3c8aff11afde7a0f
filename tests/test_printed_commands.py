"""Every `snakemake ...` command the repository prints for its users plans, as printed (a dry run of each).

Why: a printed command is copied as it stands. ``snakemake --cores 8 --resources gpu=2 hpsearch`` in the
Snakefile's header failed, because ``--resources`` (like ``--config``, ``--configfile`` and ``--forcerun``) takes
several values and swallowed the target.

Where commands are found, so that a new one is tested when written this way: in README.md, a line of a fenced
code block or a code span that starts with ``snakemake``; in the Snakefile, workflow/rules/*.smk, config/*.yaml
and profiles/*/config.yaml, a comment line or a code span that starts with ``snakemake`` (a comment line ending
in ``\\`` goes on in the next). The Makefile's quick and evidence recipes are run as ``make -n`` prints them, with
a target in SNAKEMAKE_ARGS. Commands a wrapper completes (``dvc_stage.py snakemake ...``) are not Snakemake's.

How they run: in one copy of the workflow with its profiles (so profiles/default applies, as for a user) and
data/raw linked to the real raw data (where the README tells users to put it), each with ``-n`` put first (a
flag, so it changes nothing else), with the configs as they are (a dry run costs Snakemake's start-up, a few
seconds, whatever the grid). What a user replaces: ``/path/to/raw`` and ``../shared/data`` become the raw data
folder, ``...`` (more options of one's own) is dropped, ``<run>`` is the paper's run, whose FreeLB search result
the copy holds. A command whose arguments begin another one's (``snakemake --profile profiles/gpu`` and the same
with ``--config raw_dir=...``) is planned as the longer one, which parses the same words in the same places.
Every command is parsed by Snakemake's own parser as printed; two options are left out of the plan only: a dry
run cannot render ``--report FILE`` (it needs finished results), and ``--sdm conda`` needs conda installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.paths import ROOT
from helpers.snakemake import copy_workflow, snakemake
from snakemake.cli import get_argument_parser

MARKDOWN = ("README.md",)
COMMENTED = ("Snakefile", "workflow/rules/*.smk", "config/*.yaml", "profiles/*/config.yaml")
# Files known to print commands: the extraction must keep finding them (a format change must not hide them).
PRINTING = {
    "README.md",
    "Snakefile",
    "workflow/rules/common.smk",
    "workflow/rules/hpsearch.smk",
    "config/config.yaml",
    "config/smoke.yaml",
    "profiles/default/config.yaml",
    "profiles/gpu/config.yaml",
    "profiles/quick/config.yaml",
    "profiles/slurm/config.yaml",
}
RAW_PLACEHOLDERS = ("/path/to/raw", "../shared/data")
DRY_RUN = ("-n", "--dry-run", "--dryrun")  # dropped where printed: every command gets its -n first
RAW = "@RAW_DIR@"  # the raw folder in the collected commands; each test puts the real one in
FREELB_BEST = {"datasets": {"sst2": {"freelb": {"init_mag": 0.4, "adv_lr": 0.1, "adv_max_norm": 0.0, "adv_steps": 2}}}}
CODE_SPAN = re.compile(r"`(snakemake(?:\s[^`\n]*)?)`")
COMMAND_LINE = re.compile(r"^snakemake(\s|$)")
BACKSLASH = "\\"  # a shell line continued on the next


def _without_comment(text: str) -> str:
    return re.split(r"\s#(\s|$)", text, maxsplit=1)[0].strip()


def _markdown_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line.strip())
    return lines


def _comment_lines(text: str) -> list[str]:
    """Full-line comments without their ``#``, a trailing ``\\`` joined with the next comment line."""
    lines: list[str] = []
    continued = False
    for line in text.splitlines():
        stripped = line.strip()
        body = stripped.lstrip("#").strip() if stripped.startswith("#") else None
        if body is not None and continued:
            lines[-1] = f"{lines[-1].removesuffix(BACKSLASH).rstrip()} {body}"
        elif body is not None:
            lines.append(body)
        continued = body is not None and body.endswith(BACKSLASH)
    return lines


def printed_commands(path: Path) -> list[str]:
    """Every command of ``path`` (see the module docstring), comments cut off, in the order printed."""
    text = path.read_text(encoding="utf-8")
    lines = _markdown_lines(text) if path.suffix == ".md" else _comment_lines(text)
    found = [_without_comment(line) for line in lines if COMMAND_LINE.match(line)]
    return found + [span.strip() for span in CODE_SPAN.findall(text)]


def all_printed() -> dict[str, list[str]]:
    """Repository path -> its commands, for every file that prints one."""
    paths = [ROOT / name for name in MARKDOWN] + [p for pattern in COMMENTED for p in sorted(ROOT.glob(pattern))]
    found = {str(p.relative_to(ROOT)): printed_commands(p) for p in paths}
    return {name: commands for name, commands in found.items() if commands}


def makefile_commands() -> list[str]:
    """The snakemake commands of `make quick` and `make evidence`, as make prints them, a target added."""
    commands = []
    for target in ("quick", "evidence"):
        printed = subprocess.run(
            ["make", "-n", target, "SNAKEMAKE_ARGS=hpsearch"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.replace("\\\n", " ")
        (line,) = [line for line in printed.splitlines() if "/snakemake " in line]
        words = shlex.split(line)
        start = next(i for i, word in enumerate(words) if word.endswith("/snakemake"))
        commands.append(shlex.join(["snakemake", *words[start + 1 :]]))
    return commands


def as_args(command: str) -> tuple[str, ...]:
    """The arguments after ``snakemake``, with the user's placeholders filled in (the raw folder as ``RAW``)."""
    args = []
    for word in shlex.split(command)[1:]:
        for placeholder in RAW_PLACEHOLDERS:
            word = word.replace(placeholder, RAW)
        if word not in ("...", *DRY_RUN):
            args.append(word.replace("<run>", "paper"))
    return tuple(args)


def _drop(args: tuple[str, ...], option: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` without the words ``option`` (an option and its value) where they occur."""
    for at in range(len(args) - len(option) + 1):
        if args[at : at + len(option)] == option:
            return args[:at] + args[at + len(option) :]
    return args


def for_planning(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` without what a dry run here cannot do (module docstring)."""
    if "--report" in args:
        args = _drop(args, args[args.index("--report") : args.index("--report") + 2])
    return args if shutil.which("conda") else _drop(args, ("--sdm", "conda"))


def distinct_commands() -> dict[tuple[str, ...], str]:
    """Each distinct argument list that begins no other -> where it is printed (the first place)."""
    found: dict[tuple[str, ...], str] = {}
    printed = [(name, c) for name, commands in all_printed().items() for c in commands]
    for name, command in printed + [("Makefile", c) for c in makefile_commands()]:
        found.setdefault(as_args(command), f"{name}: {command}")
    longer = [args for args in found if any(len(other) > len(args) and other[: len(args)] == args for other in found)]
    return {args: where for args, where in found.items() if args not in longer}


COMMANDS = distinct_commands()


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory: pytest.TempPathFactory, raw_dir: Path) -> Path:
    """The workflow, its profiles and package, data/raw linked to the raw data, and the paper's FreeLB choice."""
    work = copy_workflow(tmp_path_factory.mktemp("printed"), extra=("profiles", "src/carlrar"))
    (work / "data").mkdir()
    (work / "data" / "raw").symlink_to(raw_dir, target_is_directory=True)
    best = work / "results" / "paper" / "hpsearch" / "freelb_best.yaml"
    best.parent.mkdir(parents=True)
    best.write_text(yaml.safe_dump(FREELB_BEST), encoding="utf-8")
    return work


def test_every_file_known_to_print_commands_still_yields_them() -> None:
    found = all_printed()
    assert set(found) >= PRINTING, sorted(PRINTING - set(found))
    assert found["Snakefile"][:3] == [
        "snakemake --cores 8 --resources gpu=2 --config raw_dir=../shared/data",
        "snakemake --cores 4 --configfile config/smoke.yaml --replace-workflow-config --config raw_dir=../shared/data",
        "snakemake hpsearch --cores 8 --resources gpu=2",
    ]
    quick = "snakemake --profile profiles/quick --configfile config/smoke.yaml --replace-workflow-config"
    assert f"{quick} --config raw_dir=/path/to/raw" in found["profiles/quick/config.yaml"]  # a `\` continuation
    assert len(makefile_commands()) == 2


@pytest.mark.parametrize("args", list(COMMANDS), ids=list(COMMANDS.values()))
def test_printed_command_plans(args: tuple[str, ...], workflow_copy: Path, raw_dir: Path) -> None:
    args = tuple(word.replace(RAW, str(raw_dir)) for word in args)
    get_argument_parser().parse_args(list(args))  # as printed, --report and --sdm included; raises if it fails
    result = snakemake("-n", *for_planning(args), cwd=workflow_copy)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
