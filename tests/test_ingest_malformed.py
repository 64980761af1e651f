"""Ingest stage on malformed input: each bad row lands in `ingest_rejected` with its file, row number, field
and reason while the good rows go on; files that cannot be read at all raise one clear IngestError line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.config import AlolConfig
from schemas.ingest import DataConfig
from stages.ingest import run
from stages.ingest.errors import IngestError
from stages.ingest.sources import read_chatterbot
from stages.io import StageWriter
from tests.support.ingest import assert_accounted, ingest, rows

GOOD = json.dumps({"prompt": "How are you?", "response": "Fine, thanks."})
GOOD_2 = json.dumps({"prompt": "What is your name?", "response": "I am a helpful assistant."})


def jsonl(tmp_path: Path, bad: str | bytes, name: str = "input.jsonl") -> Path:
    """A JSONL file: a good row on line 1, the bad row on line 2, another good row on line 3."""
    bad_bytes = bad if isinstance(bad, bytes) else bad.encode("utf-8")
    path = tmp_path / name
    path.write_bytes(GOOD.encode() + b"\n" + bad_bytes + b"\n" + GOOD_2.encode() + b"\n")
    return path


def row(**fields) -> str:
    return json.dumps(fields)


HH_OK_PROMPT = "\n\nHuman: Can you help me?"

BAD_ROWS = {
    "missing prompt": (row(response="Sure."), "prompt", "missing"),
    "null response": (row(prompt="Hi", response=None), "response", "missing"),
    "empty response": (row(prompt="Hi", response=""), "response", "empty"),
    "blank prompt": (row(prompt="   \n\t", response="Hello"), "prompt", "empty"),
    "prompt is a number": (row(prompt=42, response="Forty-two"), "prompt", "wrong_type"),
    "response is a list": (row(prompt="Hi", response=["a", "b"]), "response", "wrong_type"),
    "message content is a number": (
        row(prompt=[{"role": "user", "content": 7}], response="ok"), "prompt", "wrong_type"
    ),
    "message with unknown role": (
        row(prompt=[{"role": "robot", "content": "hi"}], response="ok"), "prompt", "bad_message"
    ),
    "message without content": (row(prompt=[{"role": "user"}], response="ok"), "prompt", "bad_message"),
    "prompt too long": (row(prompt="x" * 201, response="ok"), "prompt", "too_long"),
    "chat prompt too long in total": (
        row(prompt=[{"role": "user", "content": "x" * 150}, {"role": "assistant", "content": "y" * 60}], response="ok"),
        "prompt", "too_long",
    ),
    "response too long": (row(prompt="Hi", response="y" * 101), "response", "too_long"),
    "lone surrogate escape": ('{"prompt": "Hi", "response": "broken \\ud800 text"}', "response", "undecodable"),
    "invalid JSON": ('{"prompt": "Hi", "response": "unterminated}', "<row>", "invalid_json"),
    "array instead of object": ('["Hi", "Hello"]', "<row>", "not_an_object"),
    "unknown split value": (row(prompt="Hi", response="Hello", split="holdout"), "split", "unknown_split"),
    "not UTF-8": (b'{"prompt": "caf\xe9", "response": "ok"}', "<row>", "undecodable"),
}


@pytest.mark.parametrize("bad, field, reason", list(BAD_ROWS.values()), ids=list(BAD_ROWS))
def test_bad_row_is_quarantined_with_file_row_field_and_reason(tmp_path, bad, field, reason):
    path = jsonl(tmp_path, bad)
    result, reader = ingest(tmp_path, source="file", path=str(path), max_prompt_chars=200, max_response_chars=100)
    assert_accounted(result, reader)
    assert result.rows_out == 2 and result.rows_rejected == 1
    [rejected] = rows(reader, "ingest_rejected")
    assert (rejected["source_file"], rejected["source_row"]) == (str(path), 2)
    assert (rejected["field"], rejected["reason"]) == (field, reason)
    assert rejected["detail"]
    expected_raw = bad.decode("utf-8", "replace") if isinstance(bad, bytes) else bad
    assert rejected["raw"] == expected_raw
    assert result.metrics.rejected_by_reason == {reason: 1}


@pytest.mark.parametrize("bad, field, reason", list(BAD_ROWS.values()), ids=list(BAD_ROWS))
def test_bad_row_fails_the_stage_naming_file_row_and_field(tmp_path, bad, field, reason):
    path = jsonl(tmp_path, bad)
    data = DataConfig(source="file", path=str(path), max_prompt_chars=200, max_response_chars=100, on_invalid="fail")
    cfg = AlolConfig(data=data)
    with pytest.raises(IngestError) as info:
        run(cfg, {}, StageWriter(tmp_path / "out"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: row 2, field {field!r}: ") and f"[{reason}]" in message


def test_duplicate_row_keeps_the_first_and_rejects_the_repeat(tmp_path):
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join([GOOD, GOOD_2, GOOD, GOOD]) + "\n", encoding="utf-8")
    result, reader = ingest(tmp_path, source="file", path=str(path), batch_rows=2)
    assert_accounted(result, reader)
    assert [r["source_row"] for r in rows(reader, "ingest_rejected")] == [3, 4]
    assert {r["reason"] for r in rows(reader, "ingest_rejected")} == {"duplicate_id"}
    assert [r["response"] for r in rows(reader)] == ["Fine, thanks.", "I am a helpful assistant."]


def test_csv_undecodable_field_is_named(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,response\nHello,Hi there\nCaf\xe9?,Yes please\nBye,See you\nOk,Gr\xfc\xdfe\n")
    result, reader = ingest(tmp_path, source="file", path=str(path))
    assert_accounted(result, reader)
    rejected = rows(reader, "ingest_rejected")
    assert [(r["source_row"], r["field"], r["reason"]) for r in rejected] == [
        (3, "prompt", "undecodable"), (5, "response", "undecodable"),
    ]
    assert "\ufffd" in rejected[0]["raw"] and result.rows_out == 2


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('prompt,response\n"multi\nline",one\nHi,Hello,extra\nBye,See you\n', encoding="utf-8")
    result, reader = ingest(tmp_path, source="file", path=str(path))
    assert_accounted(result, reader)
    [rejected] = rows(reader, "ingest_rejected")
    assert (rejected["source_row"], rejected["reason"]) == (4, "wrong_field_count")


def test_messages_without_an_assistant_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        row(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]) + "\n"
        + row(messages=[{"role": "user", "content": "Anyone there?"}]) + "\n"
        + row(messages=[{"role": "assistant", "content": "I speak first"}]) + "\n",
        encoding="utf-8",
    )
    result, reader = ingest(tmp_path, source="file", path=str(path))
    assert_accounted(result, reader)
    assert [(r["source_row"], r["reason"]) for r in rows(reader, "ingest_rejected")] == [
        (2, "no_assistant_turn"), (3, "missing"),
    ]


def test_hh_transcript_problems_reject_both_rows_of_the_pair(tmp_path):
    good = {"chosen": HH_OK_PROMPT + "\n\nAssistant: Of course.", "rejected": HH_OK_PROMPT + "\n\nAssistant: No."}
    no_markers = {"chosen": "Human: hi Assistant: hello", "rejected": HH_OK_PROMPT + "\n\nAssistant: No."}
    mismatch = {"chosen": HH_OK_PROMPT + "\n\nAssistant: Yes.", "rejected": "\n\nHuman: Other?\n\nAssistant: No."}
    ends_with_human = {
        "chosen": HH_OK_PROMPT + "\n\nAssistant: Yes.\n\nHuman: Thanks",
        "rejected": HH_OK_PROMPT + "\n\nAssistant: No.",
    }
    path = tmp_path / "hh.jsonl"
    records = (good, no_markers, mismatch, ends_with_human)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result, reader = ingest(tmp_path, source="file", path=str(path), format="hh")
    assert_accounted(result, reader)
    assert result.rows_out == 2
    assert [(r["source_row"], r["field"], r["reason"]) for r in rows(reader, "ingest_rejected")] == [
        (2, "chosen", "hh_parse"), (2, "chosen", "pair_partner_invalid"),
        (3, "rejected", "hh_prompt_mismatch"), (3, "rejected", "hh_prompt_mismatch"),
        (4, "chosen", "hh_parse"), (4, "chosen", "pair_partner_invalid"),
    ]


def test_preference_pair_with_identical_or_missing_responses(tmp_path):
    path = tmp_path / "pref.jsonl"
    path.write_text(
        row(prompt="Q1", chosen="same", rejected="same") + "\n"
        + row(prompt="Q2", chosen="good") + "\n"
        + row(prompt="Q3", chosen="good", rejected="bad") + "\n",
        encoding="utf-8",
    )
    result, reader = ingest(tmp_path, source="file", path=str(path))
    assert_accounted(result, reader)
    assert result.rows_in == 6 and result.rows_out == 2
    assert [(r["source_row"], r["field"], r["reason"]) for r in rows(reader, "ingest_rejected")] == [
        (1, "rejected", "identical_responses"), (1, "rejected", "identical_responses"),
        (2, "rejected", "pair_partner_invalid"), (2, "rejected", "missing"),
    ]


def test_pair_with_one_repeated_response_is_rejected_whole(tmp_path):
    path = tmp_path / "pref.jsonl"
    path.write_text(
        row(prompt="Q", chosen="best", rejected="worst") + "\n"
        + row(prompt="Q", chosen="best", rejected="other") + "\n",
        encoding="utf-8",
    )
    result, reader = ingest(tmp_path, source="file", path=str(path))
    assert_accounted(result, reader)
    assert [(r["preference"]) for r in rows(reader)] == ["chosen", "rejected"]
    assert [r["reason"] for r in rows(reader, "ingest_rejected")] == ["duplicate_id", "pair_partner_invalid"]


def test_row_fitting_no_format_is_quarantined_until_one_fits(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(row(question="Hi", answer="Hello") + "\n" + GOOD + "\n", encoding="utf-8")
    result, reader = ingest(tmp_path, source="file", path=str(path))
    assert_accounted(result, reader)
    assert [r["reason"] for r in rows(reader, "ingest_rejected")] == ["unknown_format"]
    only_unknown = tmp_path / "unknown.jsonl"
    only_unknown.write_text(row(question="Hi", answer="Hello") + "\n", encoding="utf-8")
    with pytest.raises(IngestError, match="no row fits a known row format"):
        ingest(tmp_path, source="file", path=str(only_unknown))


def test_column_mapping_reads_other_column_names(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(row(question="Hi", answer="Hello", extra=1) + "\n", encoding="utf-8")
    mapping = {"prompt": "question", "response": "answer"}
    result, reader = ingest(tmp_path, source="file", path=str(path), columns=mapping)
    assert result.rows_out == 1 and json.loads(rows(reader)[0]["meta"]) == {"extra": 1}


# --- files that cannot be read at all ------------------------------------------------------------


def raises_for(tmp_path: Path, name: str, content: bytes, match: str, **data) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(IngestError, match=match) as info:
        ingest(tmp_path, source="file", path=str(path), **data)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


def test_json_array_syntax_error_names_the_line(tmp_path):
    content = b'[\n {"prompt": "a", "response": "b"},\n {"prompt": "c" "response": "d"}\n]'
    message = raises_for(tmp_path, "broken.json", content, "not valid JSON")
    assert ": line 3, column 17: " in message


def test_json_file_with_undecodable_bytes_names_the_line(tmp_path):
    content = b'[\n{"prompt": "a", "response": "b"},\n{"prompt": "caf\xe9", "response": "d"}\n]'
    message = raises_for(tmp_path, "latin1.json", content, "not valid UTF-8")
    assert ": line 3: " in message


def test_json_file_that_is_not_an_array(tmp_path):
    raises_for(tmp_path, "object.json", b'{"prompt": "a", "response": "b"}', "expected a JSON array")


def test_corrupt_parquet_file(tmp_path):
    raises_for(tmp_path, "garbage.parquet", b"this is not parquet at all" * 10, "not a readable Parquet file")


def test_truncated_parquet_file(tmp_path):
    path = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 1000, "response": ["b"] * 1000}), path)
    content = path.read_bytes()
    raises_for(tmp_path, "truncated.parquet", content[: len(content) // 2], "Parquet")


def test_parquet_with_a_damaged_row_group_names_the_first_unread_row(tmp_path):
    path = tmp_path / "whole.parquet"
    n = 3000
    table = pa.table({"prompt": [f"prompt {i}" for i in range(n)], "response": [f"answer {i}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=1000, compression="none")
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    content = bytearray(path.read_bytes())
    content[offset:offset + 40] = b"\xff" * 40
    message = raises_for(tmp_path, "damaged.parquet", bytes(content), "cannot read Parquet data", batch_rows=500)
    assert ": row 1001: " in message


def test_parquet_with_unusable_columns(tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), path)
    expected = r"cannot tell the row format from the columns \['answer', 'question'\]"
    raises_for(tmp_path, "cols2.parquet", path.read_bytes(), expected)


def test_csv_without_header(tmp_path):
    raises_for(tmp_path, "empty.csv", b"", "no header row")


def test_csv_with_repeated_header_names(tmp_path):
    raises_for(tmp_path, "twice.csv", b"prompt,prompt,response\na,b,c\n", "repeated")


def test_jsonl_file_with_only_blank_lines(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n  \n")
    with pytest.raises(IngestError, match=f"^{path}: the source holds no rows$"):
        ingest(tmp_path, source="file", path=str(path))


def test_unknown_file_type_and_missing_file(tmp_path):
    raises_for(tmp_path, "data.txt", b"prompt\tresponse\n", "unknown file type '.txt'")
    with pytest.raises(IngestError, match="no such file"):
        ingest(tmp_path, source="file", path=str(tmp_path / "absent.jsonl"))


def test_broken_chatterbot_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("conversations:\n- - Hi\n  - Hello\n- - [unclosed\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"broken.yml: line \d+: not valid YAML"):
        list(read_chatterbot([path]))


def test_datasets_folder_that_does_not_load(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    (folder / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(IngestError, match="cannot load with datasets"):
        ingest(tmp_path, source="datasets", path=str(folder))
