"""The field reference of experiment files, generated from the models that read them.

`field_reference()` renders one markdown table per model of an experiment file (field, type, default,
description): the type as the source writes it, the default as YAML, and the description from
`Field(description=...)`, else the comments on the lines above the field or beside it, else a line kept here
(`NOTES`) for the few fields the source leaves uncommented.

    python -m sand.docs            # rewrite the block between the markers in docs/experiments.md
    python -m sand.docs --check    # exit 1 when that block is not what the models give now
"""
from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sand.experiment import BackendConfig, EnvEval, EvalConfig, Experiment, RetrainConfig, SandConfig
from sand.training.config import TrainConfig
from sand.trajectory import ENVS

DOC = Path(__file__).resolve().parent.parent / "docs" / "experiments.md"
START, END = "<!-- fields:start -->", "<!-- fields:end -->"

# Each model, in the order of the reference, with where its fields sit in an experiment file.
MODELS: list[tuple[type[BaseModel], str]] = [
    (Experiment, "the top level of an experiment file"),
    (BackendConfig, "`backend:`, and `sand.critic_backend:`"),
    (TrainConfig, "`train:`"),
    (EvalConfig, "`evaluation:`"),
    (EnvEval, "`evaluation.envs.<env>:`, one per environment evaluated"),
    (SandConfig, "`sand:`"),
    (RetrainConfig, "`retrain:`"),
]

# Descriptions of the fields that have neither a Field description nor a comment in the source.
NOTES: dict[tuple[str, str], str] = {
    ("Experiment", "description"): "one line, shown as the description of the experiment's Dagster job",
    ("Experiment", "base_model"): "the agent's base model: a registry name (`smollm2-135m`), a model folder or a "
                                  "Hugging Face id",
    ("Experiment", "backend"): "how generation runs (sampling, critiques, evaluation)",
    ("Experiment", "train"): "training of SFT (pi_0), of every SAND iteration and of the controls",
    ("Experiment", "evaluation"): "what every agent is evaluated on, and how",
    ("Experiment", "sand"): "the SAND loop",
    ("Experiment", "retrain"): "when sensors retrain the experiment",
    ("BackendConfig", "kind"): "`transformers` (in the run's process), `vllm` (its engine in the run's process; "
                               "the CPU build on CPUs) or `openai` (OpenAI-compatible servers, `options.base_urls`)",
    ("TrainConfig", "lora"): "LoRA adapters (true) or full finetuning (false)",
    ("TrainConfig", "lora_r"): "LoRA rank",
    ("TrainConfig", "lora_alpha"): "LoRA alpha",
    ("TrainConfig", "learning_rate"): "peak learning rate",
    ("TrainConfig", "max_steps"): "optimizer steps of one training (-1: as many as its epochs make)",
    ("TrainConfig", "per_device_batch_size"): "training windows a device takes in one pass",
    ("TrainConfig", "gradient_accumulation_steps"): "passes accumulated into one optimizer step",
    ("TrainConfig", "max_length"): "tokens of a training window; a window that would be longer ends early and the "
                                   "next one starts there, so no step is cut off",
    ("TrainConfig", "history_steps"): "steps of a training window, each window starting with the header "
                                      "(instruction, OK, task); null: whole episodes",
    ("EvalConfig", "envs"): "env -> how it is evaluated (`EnvEval`)",
    ("EvalConfig", "pool_size"): "episodes run at once (environments alive), in evaluation and critique rollouts",
    ("EvalConfig", "history_steps"): "steps of history an agent's prompt shows, a window moving in strides of half "
                                     "its length (null: all); also in sampling and rollouts",
    ("EvalConfig", "max_new_tokens"): "the agent's reply budget in tokens; every deliberation fits it with its "
                                      "action line",
    ("EnvEval", "splits"): "the splits evaluated (ALFWorld: `heldout`, `valid_seen`, `valid_unseen`; ScienceWorld: "
                           "`dev`, `test`)",
    ("SandConfig", "iterations"): "SAND iterations K",
    ("SandConfig", "n_samples"): "N: actions pi_{k-1} samples at every step (self-consistency)",
    ("SandConfig", "temperature"): "temperature of the sampled candidates and of the critique rollouts",
    ("SandConfig", "rollout_max_steps"): "agent steps a critique rollout plays after its candidate (null: to the "
                                         "task's limit)",
    ("SandConfig", "critic_backend"): "backend settings of `critic_model` (null: the experiment's `backend`)",
    ("SandConfig", "expert_switch"): "where an alternative's rollout earned more than the expert action's, D_k "
                                     "follows that rollout from the first such step",
}

# Defaults that are not a value of the model (filled in when the file is read).
DEFAULTS: dict[tuple[str, str], str] = {("Experiment", "name"): "the file's name without `.yaml`"}

# Type names the source uses that a reader of an experiment file knows by another name.
ALIASES = {"EnvName": "env"}


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines directly above its line and the comments on its own lines, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        text = " ".join(above + beside)
        if text:
            found[node.target.id] = text
    return found


def _annotations(cls: type) -> dict[str, str]:
    """Field name -> its annotation as the source writes it."""
    source = textwrap.dedent(inspect.getsource(cls))
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = ast.get_source_segment(source, node.annotation)
            for alias, name in ALIASES.items():
                text = re.sub(rf"\b{alias}\b", name, text)
            found[node.target.id] = text
    return found


def _yaml(value) -> str:
    """A value as YAML flow text (what an experiment file would say)."""
    if isinstance(value, BaseModel):
        return _yaml(value.model_dump(mode="json", exclude_defaults=True))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", value) and value not in ("null", "true", "false")
        return value if plain else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return json.dumps(str(value))


def _default(cls: type[BaseModel], name: str) -> str:
    if (cls.__name__, name) in DEFAULTS:
        return DEFAULTS[(cls.__name__, name)]
    field = cls.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel) and value == type(value)():
        return f"see [`{type(value).__name__}`](#{type(value).__name__.lower()})"
    return f"`{_yaml(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(cls: type[BaseModel], where: str) -> list[str]:
    comments, annotations = _comments(cls), _annotations(cls)
    lines = [f"### {cls.__name__}", "", f"Where: {where}."]
    doc = inspect.getdoc(cls)
    if doc and cls.__doc__:  # the class's own docstring, not one inherited from BaseModel
        lines += ["", " ".join(doc.split())]
    lines += ["", "| field | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        description = field.description or comments.get(name) or NOTES.get((cls.__name__, name), "")
        lines.append(f"| `{name}` | `{_cell(annotations.get(name, ''))}` | {_cell(_default(cls, name))} "
                     f"| {_cell(description)} |")
    return lines


def field_reference() -> str:
    """Every field of an experiment file, one markdown table per model."""
    unknown = [f"{model}.{field}" for model, field in NOTES
               if not any(cls.__name__ == model and field in cls.model_fields for cls, _ in MODELS)]
    if unknown:
        raise ValueError(f"NOTES names fields that do not exist: {', '.join(unknown)}")
    lines = [f"`env` is an environment's name: {', '.join(f'`{e}`' for e in sorted(ENVS))}. A default "
             "`see X` is the defaults of that model's fields."]
    for cls, where in MODELS:
        lines += ["", *_table(cls, where)]
    return "\n".join(lines) + "\n"


def updated(text: str) -> str:
    """`text` (the page) with the block between START and END replaced by the current reference."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {START} ... {END} block")
    return text[:start + len(START)] + "\n" + field_reference() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sand.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page's field reference is stale")
    parser.add_argument("--path", type=Path, default=DOC, help=f"the page (default: {DOC})")
    args = parser.parse_args(argv)
    text = args.path.read_text()
    new = updated(text)
    if args.check:
        if new != text:
            print(f"{args.path}: the field reference is stale: run `python -m sand.docs`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.path.write_text(new)
        print(f"{args.path}: field reference rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
