"""Ingest stage: every source and format, ids, splits, preference pairs, the per-split cap, the row invariant.

Malformed inputs are in test_ingest_malformed.py. The stage runs through `run()` with a real StageWriter
and is read back with StageReader, as the pipeline does.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.config import load_config
from schemas.ingest import INGEST_SCHEMA, REJECTED_SCHEMA, SplitFractions
from stages.ingest import run
from stages.ingest.formats import Candidate, parse_hh_transcript
from stages.ingest.ids import SeenIds, canonical_prompt, hash_split, row_digest
from stages.ingest.sources import read_chatterbot
from stages.ingest.split_cap import Group, SplitCap
from stages.io import StageReader, StageWriter
from tests.support.ingest import SAMPLES, assert_accounted, ingest, rows, write_jsonl


# --- sources -------------------------------------------------------------------------------------


def test_chatterbot_source_reads_consecutive_turns_and_rejects_repeats(tmp_path):
    result, reader = ingest(tmp_path, source="chatterbot")
    assert_accounted(result, reader)
    # 2,306 turn pairs in 21 files plus one conversation written as a plain string (trivia.yml, #14).
    assert result.rows_in == 2307
    assert result.metrics.rejected_by_reason == {"duplicate_id": 1130, "wrong_type": 1}
    assert result.rows_out == 1176
    table = rows(reader)
    assert len({r["id"] for r in table}) == len(table)
    first = table[0]
    assert first["prompt"] == [{"role": "user", "content": first["prompt"][0]["content"]}]
    assert first["source"] == "chatterbot" and first["pair_id"] is None and first["preference"] is None
    assert set(json.loads(first["meta"])) == {"topic", "conversation", "turn"}
    bad = [r for r in rows(reader, "ingest_rejected") if r["reason"] == "wrong_type"]
    assert bad[0]["source_file"].endswith("trivia.yml") and "two little ducks" in bad[0]["raw"]
    shares = {split: n / result.rows_out for split, n in result.metrics.rows_per_split.items()}
    assert 0.7 < shares["train"] < 0.9 and shares["validation"] > 0.05 and shares["test"] > 0.05


def test_chatterbot_turn_pairs_follow_the_conversation(tmp_path):
    corpus = tmp_path / "talk.yml"
    corpus.write_text("categories: [talk]\nconversations:\n- - Hi\n  - Hello\n  - How are you?\n- - Bye\n  - See you\n")
    records = list(read_chatterbot([corpus]))
    assert [(r.row, r.data["prompt"], r.data["response"]) for r in records] == [
        (1, "Hi", "Hello"), (2, "Hello", "How are you?"), (3, "Bye", "See you"),
    ]
    assert records[1].data["conversation"] == 1 and records[1].data["turn"] == 2


def test_jsonl_prompt_response_with_text_and_chat_prompts(tmp_path):
    result, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "pairs.jsonl"))
    assert_accounted(result, reader)
    assert result.rows_out == 8 and result.metrics.format == "prompt_response"
    table = rows(reader)
    assert table[0]["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert table[0]["response"] == "The capital of France is Paris."
    assert json.loads(table[0]["meta"]) == {"topic": "geography"}
    assert [m["role"] for m in table[2]["prompt"]] == ["system", "user"]
    assert [m["role"] for m in table[4]["prompt"]] == ["user", "assistant", "user"]
    assert {r["source"] for r in table} == {"pairs.jsonl"}


def test_json_array_with_completion_column(tmp_path):
    result, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "completion.json"))
    assert_accounted(result, reader)
    table = rows(reader)
    assert [r["response"] for r in table][:2] == ["Red is a primary colour.", "A spider has eight legs."]
    assert json.loads(table[3]["meta"]) == {"id_in_source": 4}


def test_csv_keeps_the_split_column_and_multiline_fields(tmp_path):
    result, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "pairs_split.csv"))
    assert_accounted(result, reader)
    table = rows(reader)
    assert [r["split"] for r in table] == ["train", "train", "validation", "test", "train", "test"]
    assert table[2]["response"].count("\n") == 2
    assert json.loads(table[2]["meta"]) == {"note": "multi-line response"}


def test_parquet_with_chat_prompts_and_split_column(tmp_path):
    result, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "pairs.parquet"), batch_rows=2)
    assert_accounted(result, reader)
    source = pq.read_table(SAMPLES / "pairs.parquet").to_pylist()
    table = rows(reader)
    assert [r["prompt"] for r in table] == [s["prompt"] for s in source]
    assert [r["split"] for r in table] == [s["split"] for s in source]
    assert json.loads(table[1]["meta"]) == {"difficulty": 2}


def test_messages_last_assistant_turn_is_the_response(tmp_path):
    result, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "messages.jsonl"))
    assert_accounted(result, reader)
    table = rows(reader)
    assert result.metrics.format == "messages"
    assert table[1]["prompt"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the boiling point of water?"},
    ]
    assert table[2]["response"] == "Then try 'My Neighbour Totoro'."
    assert [m["role"] for m in table[2]["prompt"]] == ["user", "assistant", "user"]
    # A trailing user turn after the last assistant turn is not part of the prompt.
    assert table[3]["response"] == "Cheerful." and len(table[3]["prompt"]) == 1


def test_hh_transcripts_become_pairs_with_the_shared_prompt(tmp_path):
    result, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "hh.jsonl"))
    assert_accounted(result, reader)
    table = rows(reader)
    assert result.metrics.format == "hh" and result.rows_out == 6 and result.metrics.pairs_out == 3
    chosen, rejected = table[2], table[3]
    assert (chosen["preference"], rejected["preference"]) == ("chosen", "rejected")
    assert chosen["pair_id"] == rejected["pair_id"] and chosen["id"] != rejected["id"]
    assert chosen["prompt"] == rejected["prompt"] == [
        {"role": "user", "content": "How do I make my neighbour's dog stop barking?"},
        {"role": "assistant", "content": "Have you talked with your neighbour about it?"},
        {"role": "user", "content": "Not yet."},
    ]
    assert rejected["response"] == "Throw something at it."
    assert chosen["split"] == rejected["split"]


def test_preference_pairs_text_and_conversational(tmp_path):
    result, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "preference.jsonl"))
    assert_accounted(result, reader)
    table = rows(reader)
    assert [r["preference"] for r in table] == ["chosen", "rejected"] * 3
    assert len({r["pair_id"] for r in table}) == 3
    assert table[4]["response"].startswith("Study in short sessions") and table[5]["response"].startswith("Stay up")
    assert table[4]["prompt"] == [{"role": "user", "content": "Give me a tip for studying."}]


def test_parse_hh_transcript_turns():
    turns = parse_hh_transcript("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:")
    assert turns == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": ""},
    ]
    with pytest.raises(ValueError, match="before the first"):
        parse_hh_transcript("Preamble\n\nHuman: Hi\n\nAssistant: Hello")
    with pytest.raises(ValueError, match="no"):
        parse_hh_transcript("Human: Hi Assistant: Hello")


def test_datasets_saved_dict_keeps_source_splits_and_carves_validation(tmp_path):
    datasets = pytest.importorskip("datasets")
    pairs = [{"prompt": f"question {i}", "response": f"answer {i}", "lang": "en"} for i in range(200)]
    saved = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pairs[:150]), "test": datasets.Dataset.from_list(pairs[150:])}
    ).save_to_disk(str(saved))
    result, reader = ingest(tmp_path, source="datasets", path=str(saved), batch_rows=64)
    assert_accounted(result, reader)
    table = rows(reader)
    by_prompt = {r["prompt"][0]["content"]: r["split"] for r in table}
    assert all(by_prompt[f"question {i}"] == "test" for i in range(150, 200))
    train_side = [by_prompt[f"question {i}"] for i in range(150)]
    # validation / (train + validation) = 0.1 / 0.9 of the source's train split, by prompt hash.
    assert set(train_side) == {"train", "validation"} and 5 <= train_side.count("validation") <= 35
    assert table[0]["source"] == "saved_dict" and json.loads(table[0]["meta"]) == {"lang": "en"}
    rejected_free = rows(reader, "ingest_rejected")
    assert rejected_free == []


def test_datasets_single_split_is_divided_by_prompt_hash(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved_dict"
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)}).save_to_disk(str(saved))
    result, reader = ingest(tmp_path, source="datasets", path=str(saved), dataset_split="train")
    assert_accounted(result, reader)
    table = rows(reader)
    assert result.metrics.format == "preference" and result.rows_out == 80
    fractions = SplitFractions()
    assert all(r["split"] == hash_split(canonical_prompt(r["prompt"]), fractions) for r in table)


def test_datasets_load_dataset_on_a_local_data_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "local_data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(12)])
    write_jsonl(folder / "validation.jsonl", [{"prompt": f"v{i}", "response": f"r{i}"} for i in range(3)])
    result, reader = ingest(tmp_path, source="datasets", path=str(folder))
    assert_accounted(result, reader)
    assert result.metrics.rows_per_split == {"train": 12, "validation": 3, "test": 0}


# --- ids and splits ------------------------------------------------------------------------------


def test_ids_follow_the_formula_and_are_stable_across_runs(tmp_path):
    _, first = ingest(tmp_path, source="file", path=str(SAMPLES / "pairs.jsonl"))
    _, second = ingest(tmp_path, source="file", path=str(SAMPLES / "pairs.jsonl"), batch_rows=3)
    a, b = rows(first), rows(second)
    assert [(r["id"], r["split"]) for r in a] == [(r["id"], r["split"]) for r in b]
    expected = row_digest("pairs.jsonl", canonical_prompt(a[0]["prompt"]), a[0]["response"]).hex()
    assert a[0]["id"] == expected and len(expected) == 32


def test_hash_split_is_deterministic_one_split_per_prompt_and_follows_fractions(tmp_path):
    records = [{"prompt": f"prompt {i % 300}", "response": f"response {i}"} for i in range(1200)]
    random.Random(0).shuffle(records)
    path = write_jsonl(tmp_path / "many.jsonl", records)
    result, reader = ingest(tmp_path, source="file", path=str(path), batch_rows=97)
    assert_accounted(result, reader)
    splits_of: dict[str, set[str]] = {}
    for r in rows(reader):
        splits_of.setdefault(r["prompt"][0]["content"], set()).add(r["split"])
    assert len(splits_of) == 300 and all(len(s) == 1 for s in splits_of.values())
    counts = {s: sum(1 for v in splits_of.values() if v == {s}) for s in ("train", "validation", "test")}
    assert 200 <= counts["train"] <= 280 and counts["validation"] >= 15 and counts["test"] >= 15
    skewed = SplitFractions(train=0.0, validation=0.0, test=1.0)
    assert hash_split(canonical_prompt([{"role": "user", "content": "x"}]), skewed) == "test"


def test_split_fractions_from_config_change_the_assignment(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(50)])
    cfg = load_config(
        profile=None,
        overrides={
            "data.source": "file",
            "data.path": str(path),
            "data.split_fractions": {"train": 0.5, "validation": 0.5, "test": 0.0},
        },
    )
    writer = StageWriter(tmp_path / "out")
    result = run(cfg, {}, writer)
    assert result.metrics.rows_per_split["test"] == 0
    assert 10 <= result.metrics.rows_per_split["validation"] <= 40


# --- preference pairs and the per-split cap ------------------------------------------------------


def test_max_rows_per_split_keeps_the_smallest_ids_whatever_the_order(tmp_path):
    records = [{"prompt": f"prompt {i}", "response": f"response {i}"} for i in range(500)]
    kept_sets = []
    for seed in (0, 1):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        (tmp_path / f"order{seed}").mkdir()
        # Same file name: the source name is part of every id.
        path = write_jsonl(tmp_path / f"order{seed}" / "shuffled.jsonl", shuffled)
        result, reader = ingest(tmp_path, source="file", path=str(path), max_rows_per_split=20, batch_rows=50)
        assert_accounted(result, reader)
        assert result.metrics.rows_per_split == {"train": 20, "validation": 20, "test": 20}
        assert result.metrics.rejected_by_reason == {"over_max_rows_per_split": 440}
        assert result.metrics.rows_invalid == 0
        kept_sets.append({r["id"] for r in rows(reader)})
    assert kept_sets[0] == kept_sets[1]
    # The kept rows of each split are that split's 20 smallest ids, written in id order.
    _, full = ingest(tmp_path, source="file", path=str(tmp_path / "order0" / "shuffled.jsonl"))
    everything = rows(full)
    table = rows(reader)
    for split in ("train", "validation", "test"):
        smallest = sorted(r["id"] for r in everything if r["split"] == split)[:20]
        assert [r["id"] for r in table if r["split"] == split] == smallest


def test_max_rows_per_split_keeps_preference_pairs_whole(tmp_path):
    records = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "pref.jsonl", records)
    result, reader = ingest(tmp_path, source="file", path=str(path), max_rows_per_split=5)
    assert_accounted(result, reader)
    table = rows(reader)
    per_pair: dict[str, list[str]] = {}
    for r in table:
        per_pair.setdefault(r["pair_id"], []).append(r["preference"])
    assert all(sorted(v) == ["chosen", "rejected"] for v in per_pair.values())
    assert all(n <= 5 for n in result.metrics.rows_per_split.values())
    assert result.metrics.rows_per_split["train"] == 4


def test_split_cap_equals_the_longest_prefix_in_key_order():
    rng = random.Random(3)
    for _ in range(200):
        limit = rng.randint(1, 12)
        groups = []
        for _ in range(rng.randint(0, 30)):
            size = rng.choice((1, 2))
            group = Group(record=None, candidates=[Candidate(None, None, None, None)] * size)
            group.ids = [rng.randbytes(16) for _ in range(size)]
            group.pair_id = rng.randbytes(16) if size == 2 else None
            groups.append(group)
        cap = SplitCap(limit)
        cut = [c for g in groups for c in cap.offer(g)]
        expected, total = [], 0
        for group in sorted(groups, key=lambda g: g.order_key):
            if total + len(group.candidates) > limit:
                break
            expected.append(group)
            total += len(group.candidates)
        assert [id(g) for g in cap.kept()] == [id(g) for g in expected]
        assert len(cut) + len(expected) == len(groups)


def test_seen_ids_matches_a_set():
    rng = np.random.default_rng(0)
    pool = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(300)]
    pool[7] = b"\x00" * 16  # trailing zero bytes must not confuse the fixed-width comparison
    pool[8] = b"\x01" + b"\x00" * 15
    seen, reference = SeenIds(), set()
    for start in range(0, 300, 37):
        batch = pool[start:start + 37]
        probe = np.array(pool, dtype="S16")
        assert list(seen.contains(probe)) == [k in reference for k in pool]
        seen.add(batch)
        reference.update(batch)
    assert len(seen.runs) < 5


# --- the stage contract --------------------------------------------------------------------------


def test_every_candidate_row_is_accounted_for_on_a_mixed_file(tmp_path):
    lines = [
        json.dumps({"prompt": "a", "chosen": "x", "rejected": "y"}),
        json.dumps({"prompt": "b", "chosen": "x", "rejected": ""}),
        "not json",
        json.dumps({"prompt": "a", "chosen": "x", "rejected": "y"}),
        json.dumps({"prompt": "c", "chosen": "z", "rejected": "w"}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result, reader = ingest(tmp_path, source="file", path=str(path), max_rows_per_split=2)
    assert_accounted(result, reader)
    assert result.rows_in == 9 and result.metrics.source_rows == 5
    reasons = result.metrics.rejected_by_reason
    assert reasons["empty"] == 1 and reasons["pair_partner_invalid"] == 1 and reasons["invalid_json"] == 1
    assert reasons["duplicate_id"] == 2


def test_tables_have_the_declared_schemas(tmp_path):
    _, reader = ingest(tmp_path, source="file", path=str(SAMPLES / "preference.jsonl"))
    assert reader.read("ingest").schema.equals(INGEST_SCHEMA)
    assert reader.read("ingest_rejected").schema.equals(REJECTED_SCHEMA)
    assert reader.manifest.columns["ingest"]["prompt"].startswith("list<")


def test_per_split_caps_cap_only_the_named_splits(tmp_path):
    cfg = load_config("smoke", overrides={"data.max_rows_per_split": {"train": 30, "test": 5}})
    writer = StageWriter(tmp_path / "ingest" / "k")
    result = run(cfg, {}, writer)
    writer.commit(stage="ingest", cache_key="k" * 64, result=result, config_fingerprints={}, config={}, inputs={},
                  code_version="c", versions={})
    splits = StageReader(tmp_path / "ingest" / "k").read("ingest").column("split").to_pylist()
    assert splits.count("train") == 30 and splits.count("test") == 5
    assert splits.count("validation") > 100, "validation has no cap"
    assert result.rows_in == result.rows_out + result.rows_rejected


def test_chatterbot_rows_name_their_file_relative_to_the_package(tmp_path):
    """ingest_rejected.source_file must not carry where the environment lives (two checkouts, one hash)."""
    import shutil
    from pathlib import Path

    from stages.ingest.sources import chatterbot_files, read_chatterbot

    installed = chatterbot_files()[:2]
    copy_dir = tmp_path / "elsewhere" / "chatterbot_corpus" / "data" / "english"
    copy_dir.mkdir(parents=True)
    copies = [Path(shutil.copy(path, copy_dir)) for path in installed]
    here = [(r.file, r.row, r.data) for r in read_chatterbot(installed)]
    there = [(r.file, r.row, r.data) for r in read_chatterbot(copies)]
    assert here == there
    assert here[0][0] == f"chatterbot_corpus/data/english/{installed[0].name}"


def test_final_split_is_carved_from_test_alone_and_leaves_train_and_validation_as_they_were(tmp_path):
    _, before = ingest(tmp_path / "before", source="chatterbot")
    result, after = ingest(tmp_path / "after", source="chatterbot", final_fraction=0.5)
    assert_accounted(result, after)
    by_split = lambda reader: {(r["id"], r["split"]) for r in rows(reader)}  # noqa: E731
    old, new = by_split(before), by_split(after)
    assert {x for x in old if x[1] in ("train", "validation")} == {x for x in new if x[1] in ("train", "validation")}
    old_test = {i for i, s in old if s == "test"}
    new_test, final = {i for i, s in new if s == "test"}, {i for i, s in new if s == "final"}
    assert new_test | final == old_test and not new_test & final
    assert 0.3 < len(final) / len(old_test) < 0.7
    assert result.metrics.rows_per_split["final"] == len(final)
    # One prompt, one split: rows sharing a prompt are never across test and final.
    prompts = {}
    for r in rows(after):
        prompts.setdefault(json.dumps(r["prompt"]), set()).add(r["split"])
    assert all(len(splits) == 1 for splits in prompts.values())
    # evaluate.split picks which of them the evaluation reads.
    from stages.evaluate.prompts import test_prompts

    assert set(test_prompts(after, "final")[0]) <= final and set(test_prompts(after, "test")[0]) <= new_test
    with pytest.raises(ValueError, match="data.final_fraction > 0 makes one"):
        test_prompts(before, "final")


# --- the cache key covers the data files --------------------------------------------------------


def test_an_edited_data_file_is_ingested_again_and_an_untouched_one_is_reused(tmp_path):
    """The ingest cache key holds the data file's sha256: the same settings over other bytes at the same
    path are a new key (fresh rows), the same bytes again the old one (reused, whatever the mtime)."""
    import os

    from pipeline.runner import cache_key, execute_stage
    from stages.ingest.sources import source_fingerprint

    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(20)])
    cfg = load_config(profile=None, overrides={"data.source": "file", "data.path": str(path), "run.root": str(tmp_path / "runs")})
    first, reused = execute_stage(cfg, "ingest", {})
    assert not reused and first.rows == {"ingest": 20, "ingest_rejected": 0}
    assert execute_stage(cfg, "ingest", {})[1]
    os.utime(path, ns=(1, 1))  # touched, same bytes: the same key
    assert execute_stage(cfg, "ingest", {})[1]

    write_jsonl(path, [{"prompt": f"p{i}", "response": "r"} for i in range(25)])
    assert list(source_fingerprint(cfg.data)) == ["data.jsonl"]
    second, reused = execute_stage(cfg, "ingest", {})
    assert not reused and second.rows["ingest"] == 25
    assert second.cache_key == cache_key(cfg, "ingest", {}) != first.cache_key
    assert source_fingerprint(load_config(profile=None, overrides={"data.source": "chatterbot"}).data)  # the corpus files
