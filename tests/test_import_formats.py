"""Trajectory files written elsewhere: every shape of the ETO / ShareGPT family is stored as the same trajectory,
with or without ETO's instruction header; a file that cannot be read unambiguously is refused, naming the record
and the field; files are UTF-8. Real files, the engine's import, a real store."""
import json
import re

import polars as pl
import pytest

from jobs.cli import main
from sand import datasets
from sand.errors import SandError, ValidationError
from sand.formats import eto
from sand.store import Lineage, Store
from sand.trajectory import from_frame
from tests.conftest import DATA

HEADER, OK, TASK, *STEPS = json.loads((DATA / "eto_alfworld_sample.json").read_text())[0]["conversations"]
SHAREGPT = [TASK, *STEPS]  # ETO's conversation without its header
ROLES = {"human": "user", "gpt": "assistant"}


def chat(turns):
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]


def mixed(turns):
    """Every other turn written with the chat keys, and one with both pairs (agreeing)."""
    keyed = [chat([t])[0] if i % 2 else t for i, t in enumerate(turns)]
    keyed[1] = {**turns[1], **keyed[1]}
    return keyed


SYSTEM = {"role": "system", "content": "You are a helpful household agent."}


def write_json(path, records):
    path.write_text(json.dumps(records))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_parquet(column):
    return lambda path, records: pl.DataFrame({column: [r[column] for r in records]}).write_parquet(path)


def write_bom(path, records):
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())


FORMATS = {
    "sharegpt_without_header.json": (write_json, [{"conversations": SHAREGPT}]),
    "sharegpt_with_header.jsonl": (write_jsonl, [{"conversations": [HEADER, OK, *SHAREGPT]}]),
    "messages_with_system.json": (write_json, [{"messages": [SYSTEM, *chat(SHAREGPT)]}]),
    "messages_with_header.jsonl": (write_jsonl, [{"messages": [SYSTEM, *chat([HEADER, OK, *SHAREGPT])]}]),
    # The instruction and the task in one turn: the first reply has an action, so that turn is the task.
    "instruction_in_task_turn.json": (write_json, [{"conversations": [
        {"from": "human", "value": f"{HEADER['value']}\n\n{TASK['value']}"}, *STEPS]}]),
    "bare_list.json": (write_json, [SHAREGPT]),
    "mixed_keys.json": (write_json, [{"conversations": mixed(SHAREGPT)}]),
    "conversations.parquet": (write_parquet("conversations"), [{"conversations": SHAREGPT}]),
    "messages.parquet": (write_parquet("messages"), [{"messages": [SYSTEM, *chat([HEADER, OK, *SHAREGPT])]}]),
    "byte_order_mark.json": (write_bom, [{"conversations": SHAREGPT}]),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_is_stored_as_the_same_trajectory(sand_home, tmp_path, name):
    write, records = FORMATS[name]
    path = tmp_path / name
    write(path, records)
    store = Store()
    written = datasets.import_eto(store, path, "alfworld", Lineage(asset="test"))
    [stored] = from_frame(store.read("source_trajectories", written.ref.dataset, written.ref.version))
    assert stored.id == f"{path.stem}_0"  # the file has no ids: file stem and record number
    assert stored.instruction.endswith(TASK["value"])  # the task, never an observation: no turn is shifted
    assert stored.task == "pick_clean_then_place_in_recep"
    assert len(stored.steps) == 6
    assert (stored.steps[0].thought, stored.steps[0].action) == ("A mug is often on the countertop.",
                                                                 "go to countertop 1")
    assert stored.steps[0].observation == "On the countertop 1, you see a mug 1."
    assert stored.steps[-1].action == "put mug 1 in/on cabinet 1"


def test_records_keep_their_ids_and_fields(tmp_path):
    path = tmp_path / "ids.jsonl"
    write_jsonl(path, [{"id": 17, "messages": chat(SHAREGPT), "reward": 1},
                       {"id": "b", "conversations": SHAREGPT[:2], "task": "pick_and_place_simple"}])
    first, second = eto.load_eto(path, "alfworld")
    assert (first.id, first.reward, len(first.steps)) == ("17", 1.0, 6)
    assert (second.id, second.task, len(second.steps), second.steps[0].observation) == (
        "b", "pick_and_place_simple", 1, "")


def bad(turns_or_record, record_id="b"):
    """A good record, then one with an id and the given turns (or record)."""
    record = turns_or_record if isinstance(turns_or_record, dict) else {"conversations": turns_or_record}
    return [{"id": "a", "conversations": SHAREGPT}, {"id": record_id, **record}]


@pytest.mark.parametrize("records, record, field", [
    # `from` and `role` name different roles.
    (bad({"messages": [chat(SHAREGPT)[0], {"from": "gpt", "role": "user", "content": STEPS[0]["value"]},
                       *chat(SHAREGPT)[2:]]}), "b", "messages[1].role"),
    (bad({"messages": [*chat(SHAREGPT[:3]), {"role": "tool", "content": "done"}]}), "b", "messages[3].role"),
    (bad({"messages": [SYSTEM, *chat(SHAREGPT[:2]), SYSTEM, *chat(SHAREGPT[2:])]}), "b", "messages[3].role"),
    (bad([TASK, TASK, *STEPS]), "b", "conversations[1].from"),
    # A first reply with no action is a header's "OK" only if it has no thought and the task follows it.
    (bad([TASK, {"from": "gpt", "value": "Thought: A mug is often on the countertop."}, *STEPS[1:]]), "b",
     "conversations[1].value"),
    (bad([HEADER, OK, STEPS[1], *STEPS]), "b", "conversations[1].value"),  # the turn after "OK" is an observation
    (bad([TASK, {"from": "gpt", "value": "Action: look", "content": "Action: go to countertop 1"}, *STEPS[1:]]),
     "b", "conversations[1].content"),
    (bad({"conversations": SHAREGPT, "messages": chat(SHAREGPT)}), "b", "messages"),
    (bad({"conversations": SHAREGPT[:1]}), "b", "conversations"),
    (bad({"text": TASK["value"]}), "b", "(record)"),
    ([SHAREGPT, [*SHAREGPT[:3], {"from": "gpt"}]], "#1", "[3].value"),  # a bare list: the field is the turn
    (SHAREGPT, "#0", "(record)"),  # one conversation, not a list of conversations
])
def test_ambiguous_files_are_refused_naming_record_and_field(tmp_path, records, record, field):
    path = tmp_path / "ambiguous.json"
    write_json(path, records)
    with pytest.raises(ValidationError) as err:
        eto.load_eto(path, "alfworld")
    assert (err.value.source, str(err.value.record), err.value.field) == (str(path), record, field)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_file_that_is_not_utf8_is_refused_naming_the_byte(sand_home, tmp_path, capsys, bom):
    path = tmp_path / "latin1.json"
    data = bom + json.dumps([{"conversations": SHAREGPT}]).replace("mug", "caf\u00e9", 1).encode("latin-1")
    path.write_bytes(data)
    offset = data.index(b"\xe9")  # where the BOM, if any, is counted
    with pytest.raises(SandError, match=re.escape(f"{path}: not UTF-8: byte offset {offset} ")):
        eto.load_eto(path, "alfworld")
    with pytest.raises(SystemExit) as exit:
        main(["import", str(path), "--env", "alfworld", "--direct"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"byte offset {offset}" in err and "Traceback" not in err


@pytest.mark.parametrize("direct", [[], ["--direct"]])
def test_dry_run_prints_the_first_records_and_stores_nothing(sand_home, tmp_path, capsys, direct):
    path = tmp_path / "many.json"
    write_json(path, [SHAREGPT] * 6)
    main(["import", str(path), "--env", "alfworld", "--dry-run", *direct])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"dry run: 6 alfworld trajectories from {path} would be imported as 'import/many'")
    shown = [line for line in out if "first action" in line]
    assert shown == [f"  many_{i}: task pick_clean_then_place_in_recep, 6 steps, first action 'go to countertop 1'"
                     for i in range(5)]
    assert out[2].startswith("    instruction: You are in the middle of a room.")
    assert out[-1] == "  ... and 1 more"
    stored = sorted(str(p.relative_to(sand_home)) for p in sand_home.rglob("*") if p.is_file())
    assert stored == ["dagster/dagster.yaml"]  # the CLI's Dagster settings; no store, no run
