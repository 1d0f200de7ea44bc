"""The docs against the code they describe: every command and serve flag named somewhere, every
relative link landing on a file (and heading), and the README kept a front door.

Fast: the CLIs' argparse parsers are built, never run (`parse_args` is stopped before it
parses), and the markdown is read as text.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import ministack

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250


class _Built(Exception):
    """Raised instead of parsing: carries the parser a CLI's main() built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def built_parser(module: ModuleType, argv: list[str]) -> argparse.ArgumentParser:
    """The argparse parser `module.main(argv)` builds, taken at its parse_args: nothing runs."""

    def stop(self, args=None, namespace=None):
        raise _Built(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Built) as built:
            module.main(argv)
    return built.value.parser


def dispatched_words(module: ModuleType) -> list[str]:
    """Sub-commands a CLI's main() takes off argv[0] itself, before argparse sees the rest
    (`ministack train vae`, `ministack serve needle`): each `argv[0] == "word"` or
    `argv[0] in NAME` (a module-level tuple) in main's source."""
    words: list[str] = []
    for node in ast.walk(ast.parse(inspect.getsource(module.main).lstrip())):
        if not (isinstance(node, ast.Compare) and ast.unparse(node.left) == "argv[0]"):
            continue
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, ast.Eq) and isinstance(right, ast.Constant):
                words.append(right.value)
            elif isinstance(op, ast.In) and isinstance(right, ast.Name):
                words += list(getattr(module, right.id))
    return words


def subcommands(parser: argparse.ArgumentParser) -> list[list[str]]:
    """Every path of argparse sub-parsers below `parser`, e.g. ["count"], ["sweep"]."""
    paths: list[list[str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append([name])
                paths += [[name, *rest] for rest in subcommands(sub)]
    return paths


def command_paths() -> list[list[str]]:
    """Every `ministack ...` command: the dispatcher's, each package CLI's argparse sub-parsers,
    and the words a package CLI dispatches itself."""
    paths: list[list[str]] = []
    for name, (module_name, _) in ministack.COMMANDS.items():
        module = importlib.import_module(module_name)
        paths.append([name])
        paths += [[name, *sub] for sub in subcommands(built_parser(module, []))]
        paths += [[name, word] for word in dispatched_words(module)]
    return paths


def serve_parsers() -> dict[str, argparse.ArgumentParser]:
    """`ministack serve`'s parser and those of the sub-commands it dispatches (needle, ruler)."""
    import serve.cli

    parsers = {"ministack serve": serve.cli.parser()}
    for word in dispatched_words(serve.cli):
        parsers[f"ministack serve {word}"] = built_parser(serve.cli, [word])
    return parsers


def docs_text(paths: list[Path]) -> str:
    return "\n".join(p.read_text() for p in paths)


def test_every_subcommand_is_mentioned_in_the_readme_or_the_docs():
    text = docs_text([README, *DOCS])
    paths = command_paths()
    assert {"flops", "train", "serve", "scaling", "sample"} <= {p[0] for p in paths}
    assert any(len(p) > 1 for p in paths)  # the walk reached the sub-commands
    missing = [
        " ".join(["ministack", *p])
        for p in paths
        if not re.search(r"\bministack\s+" + r"\s+".join(map(re.escape, p)) + r"\b", text)
    ]
    assert not missing, f"commands named nowhere in README.md or docs/*.md: {missing}"


def test_the_dispatched_words_are_the_ones_main_handles():
    import train.cli

    assert dispatched_words(train.cli) == list(train.cli.STAGES)
    assert built_parser(train.cli, ["vae"]).prog == "ministack train"


def test_every_serve_flag_is_in_the_serving_flag_reference():
    text = (ROOT / "docs" / "serving.md").read_text()
    missing = []
    for command, parser in serve_parsers().items():
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
        assert flags, command
        missing += [
            f"{command} {flag}" for flag in flags if not re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text)
        ]
    assert not missing, f"flags missing from docs/serving.md: {missing}"


FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(markdown: str) -> str:
    """The markdown without fenced blocks and inline code, where a `#` or `[x](y)` is not markup."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercased, everything but letters,
    digits, spaces, '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text()), re.M):
        base = slug(match.group(1))
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def test_slug_follows_githubs_rule():
    assert slug("Training MFU of the DiT (`bench/dit_mfu.py`)") == "training-mfu-of-the-dit-benchdit_mfupy"
    assert slug("On a cluster (SLURM, multi-node, preemption)") == "on-a-cluster-slurm-multi-node-preemption"
    assert slug("A [linked](x.md) heading, 2×") == "a-linked-heading-2"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    assert not [p.name for p in DOCS if p.resolve() not in linked], "docs pages missing from the README's index"


def test_the_readme_is_a_front_door():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail into docs/"
