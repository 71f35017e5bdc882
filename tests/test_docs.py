"""The documentation says what the code does: the generated field reference is current, every relative link
resolves, and every `sand` command in a code block parses with the real command's parser."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from jobs import cli as jobs_cli
from sand import docs

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
MENTIONS_SAND = re.compile(r"(^|[\s;&|/])sand(\s|$)")


def _ids(pages: list[Path]) -> list[str]:
    return [page.relative_to(REPO).as_posix() for page in pages]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in FENCE.finditer(text)]


def relative_links(text: str) -> list[str]:
    """Link targets outside code that point into the repository (no scheme, not a pure #anchor), fragments
    stripped."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = [m.group(1) for m in LINK.finditer(prose)] + [m.group(1) for m in REFERENCE.finditer(prose)]
    found = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto, ...; anchors within the page
        found.append(target.split("#", 1)[0])
    return found


def sand_commands(text: str) -> list[list[str]]:
    """The arguments of every `sand ...` / `.venv/bin/sand ...` command in the page's shell code blocks (after
    environment assignments, in `&&` / `;` / `|` chains), `<placeholders>` replaced by a harmless value."""
    commands = []
    for language, body in code_blocks(text):
        if language not in SHELL_BLOCKS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if not MENTIONS_SAND.search(line):
                continue  # only lines that may run `sand` are read as shell
            lexer = shlex.shlex(PLACEHOLDER.sub("placeholder", line), posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
            command: list[str] = []
            for token in [*tokens, ";"]:
                if token and set(token) <= set(";&|"):
                    while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
                        command.pop(0)  # VAR=value before the command
                    if command and (command[0] == "sand" or command[0].endswith("/sand")):
                        commands.append(command[1:])
                    command = []
                else:
                    command.append(token)
    return commands


def parse_error(args: list[str]) -> str | None:
    """None if the installed `sand` command accepts `args`, else argparse's complaint."""
    parser = jobs_cli.build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {exc.code}"
    return None


def test_the_field_reference_is_current():
    assert docs.main(["--check"]) == 0, "docs/experiments.md is stale: run `python -m sand.docs`"


def test_the_field_reference_covers_every_field():
    reference = docs.field_reference()
    for model, _ in docs.MODELS:
        assert f"### {model.__name__}" in reference
        for name in model.model_fields:
            assert f"| `{name}` |" in reference, f"{model.__name__}.{name}"


def test_the_check_fails_on_a_stale_page(tmp_path):
    page = tmp_path / "experiments.md"
    page.write_text(f"# Experiments\n\n{docs.START}\nold\n{docs.END}\n")
    assert docs.main(["--check", "--path", str(page)]) == 1
    assert docs.main(["--path", str(page)]) == 0
    assert docs.main(["--check", "--path", str(page)]) == 0
    assert page.read_text().startswith(f"# Experiments\n\n{docs.START}\n`env`")


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page):
    missing = [target for target in relative_links(page.read_text())
               if target and not (page.parent / target).resolve().exists()]
    assert missing == []


def test_the_pages_link_to_each_other():
    readme = relative_links((REPO / "README.md").read_text())
    unlinked = [p for p in _ids(PAGES[1:]) if p not in readme]
    assert unlinked == [], "every page in docs/ is linked from the README's Documentation section"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_sand_commands_parse(page):
    commands = sand_commands(page.read_text())
    errors = [f"sand {' '.join(args)}: {error}" for args in commands if (error := parse_error(args)) is not None]
    assert errors == []


def test_the_command_check_sees_commands_and_rejects_unknown_ones():
    assert len([c for p in PAGES for c in sand_commands(p.read_text())]) >= 10
    text = ("```bash\nbash scripts/setup.sh && .venv/bin/sand run quickstart   # comment\n"
            "SAND_HOME=/tmp/x sand report <exp> --vs base\nhelm upgrade -n sand x\n```\n")
    assert sand_commands(text) == [["run", "quickstart"], ["report", "placeholder", "--vs", "base"]]
    assert "invalid choice" in parse_error(["frobnicate"])
    assert parse_error(["report", "--no-such-flag"]) is not None
    assert parse_error(["sql", "select 1", "--format", "csv"]) is None
