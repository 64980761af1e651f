"""Every `alol` command the README shows parses, and each of its subcommand + flag combinations is
exercised by a named test (TESTED_BY): the test exists and runs that subcommand with those flags
(its source, or a helper of its module it calls, holds the literals). A README command with no
entry fails here; so does an entry the README no longer shows."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
WALKTHROUGH = "tests/test_readme_commands.py::test_readme_commands_on_tiny_inputs"

TESTED_BY: dict[tuple[str, frozenset[str]], str] = {
    ("run", frozenset()): WALKTHROUGH,
    ("run", frozenset({"--profile"})): WALKTHROUGH,
    ("run", frozenset({"--set"})): WALKTHROUGH,
    ("run", frozenset({"--config"})): WALKTHROUGH,
    ("run", frozenset({"--config", "--set"})): WALKTHROUGH,
    ("run", frozenset({"--stages"})): WALKTHROUGH,
    ("run", frozenset({"--stages", "--refresh"})): WALKTHROUGH,
    ("run", frozenset({"--stages", "--set"})): "tests/test_train_distributed.py::test_cli_refuses_nodes_without_a_rendezvous_before_any_work",
    ("status", frozenset()): WALKTHROUGH,
    ("status", frozenset({"--verify"})): "tests/test_sql.py::test_status_verify_names_the_damaged_output",
    ("report", frozenset()): WALKTHROUGH,
    ("compare", frozenset()): WALKTHROUGH,
    ("compare", frozenset({"--algorithms"})): WALKTHROUGH,
    ("compare", frozenset({"--seeds"})): WALKTHROUGH,
    ("compare", frozenset({"--value-ablation"})): WALKTHROUGH,
    ("compare", frozenset({"--seeds", "--value-ablation"})): WALKTHROUGH,
    ("compare", frozenset({"--final"})): WALKTHROUGH,
    ("compare", frozenset({"--set", "--algorithms", "--seeds"})): WALKTHROUGH,
    ("compare", frozenset({"--profile", "--set", "--algorithms", "--seeds"})): WALKTHROUGH,
    ("compare", frozenset({"--set", "--algorithms", "--seeds", "--value-ablation"})): WALKTHROUGH,
    ("run", frozenset({"--final"})): WALKTHROUGH,
    ("export", frozenset()): "tests/test_export.py::test_export_refuses_a_folder_in_the_way_and_leaves_it",
    ("export", frozenset({"--dtype"})): "tests/test_export.py::test_export_of_a_run_where_no_checkpoint_beat_pi_ref_exports_pi_ref",
    ("export", frozenset({"--run", "--dtype"})): WALKTHROUGH,
    ("sql", frozenset()): WALKTHROUGH,
    ("sql", frozenset({"--format"})): "tests/test_sql.py::test_cli_sql_latest_run_views_and_refusal",
    ("sql", frozenset({"--out"})): "tests/test_sql.py::test_cli_cannot_write_into_the_run_through_explain_analyze_or_out",
    ("sql", frozenset({"--views"})): "tests/test_tables.py::test_views_file_works_in_the_duckdb_cli",
    ("sql", frozenset({"--describe"})): "tests/test_tables.py::test_cli_describe_prints_columns_types_and_descriptions",
    ("up", frozenset()): "tests/test_deployments.py::test_full_deployment_runs_caches_and_refreshes_one_stage",
    ("up", frozenset({"--port"})): "tests/test_deployments.py::test_full_deployment_runs_caches_and_refreshes_one_stage",
    ("down", frozenset()): "tests/test_deployments.py::test_full_deployment_runs_caches_and_refreshes_one_stage",
    ("run", frozenset({"--profile", "--set"})): WALKTHROUGH,
    ("status", frozenset({"--profile", "--set"})): "tests/test_s3.py::test_the_pipeline_on_s3_gives_the_content_hashes_of_a_local_run",
    ("sql", frozenset({"--profile", "--set"})): "tests/test_s3.py::test_the_pipeline_on_s3_gives_the_content_hashes_of_a_local_run",
    ("report", frozenset({"--profile", "--set"})): "tests/test_s3.py::test_the_pipeline_on_s3_gives_the_content_hashes_of_a_local_run",
}
"""(subcommand, flags) of a README command -> the test that runs it (on the smoke profile or tiny inputs)."""

CODE_LINE = re.compile(r"(?:^|\s)(?:\.venv/bin/)?alol ([a-z]+\b[^#&|>]*)")
INLINE = re.compile(r"`(?:\.venv/bin/)?alol\s+([a-z]+\b[^`]*)`")


def readme_commands(text: str, inline: bool = True) -> list[list[str]]:
    """The `alol ...` commands of the README: in code blocks (up to a comment, `&&`, `|` or `>`) and, with
    `inline`, in inline code (mentions such as `alol export`, which need not be complete commands)."""
    commands, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:
            commands += [m.group(1) for m in CODE_LINE.finditer(line)]
    if inline:
        commands += [" ".join(m.group(1).split()) for m in INLINE.finditer(text)]
    return [shlex.split(c) for c in commands]


def combination(tokens: list[str]) -> tuple[str, frozenset[str]]:
    return tokens[0], frozenset(t.split("=", 1)[0] for t in tokens if t.startswith("--"))


def test_readme_commands_are_found():
    found = {combination(t) for t in readme_commands(README.read_text(encoding="utf-8"))}
    assert ("export", frozenset({"--run", "--dtype"})) in found and ("sql", frozenset({"--views"})) in found
    assert readme_commands("```bash\n.venv/bin/alol sql --views > v.sql  # x\n```\nsee `alol up\n--port 0`.") == [
        ["sql", "--views"], ["up", "--port", "0"],
    ]


def test_every_readme_command_parses():
    parser = build_parser()
    commands = readme_commands(README.read_text(encoding="utf-8"), inline=False)
    assert len(commands) >= 20, "the README's code blocks hold the commands a user types"
    for tokens in commands:
        try:
            parser.parse_args(tokens)
        except SystemExit:
            pytest.fail(f"README command `alol {' '.join(tokens)}` does not parse")


def _functions(path: Path) -> tuple[dict[str, ast.FunctionDef], ast.Module]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}, tree


def _test_source(reference: str) -> str:
    """The source of the test function `file::name` and of the functions it calls by name: the module's
    own and those it imports from tests/support."""
    path, name = reference.split("::")
    functions, tree = _functions(REPO / path)
    assert name in functions, f"{reference}: no such test function"
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.support."):
            support, _ = _functions(REPO / (node.module.replace(".", "/") + ".py"))
            functions.update({a.name: support[a.name] for a in node.names if a.name in support})
    called = {n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions}
    return "\n".join(ast.unparse(functions[f]) for f in {name, *called})


def test_every_readme_command_is_exercised_by_a_test():
    found = {combination(t) for t in readme_commands(README.read_text(encoding="utf-8"))}
    untested = sorted(f"alol {c} {' '.join(sorted(flags))}".strip() for c, flags in found - set(TESTED_BY))
    assert not untested, f"README commands no test runs (add one, and an entry to TESTED_BY): {untested}"
    assert not set(TESTED_BY) - found, f"TESTED_BY entries the README no longer shows: {set(TESTED_BY) - found}"
    for (command, flags), reference in TESTED_BY.items():
        source = _test_source(reference)
        for literal in (command, *flags):
            # single quotes: a literal of the test's code (ast.unparse); double: one inside a script it runs
            assert f"'{literal}'" in source or f'"{literal}"' in source, f"{reference} does not run `alol {command}` with {literal}"
