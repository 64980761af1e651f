"""Independent readers of what alol writes for people: Markdown tables and PNG files."""

from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse_markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every GitHub table in `text` as a list of {header: cell} rows (an independent reader for the tests)."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in block]
            header, rule, body = cells[0], block[1], cells[2:]
            assert set(rule.replace("|", "")) == {"-"}, f"second table line is not a rule: {rule}"
            assert all(len(row) == len(header) for row in body), block
            tables.append([dict(zip(header, row)) for row in body])
            block = []
    return tables
