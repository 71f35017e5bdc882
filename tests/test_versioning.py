"""Code versions and model identities cannot go stale: a change to any engine code a stage runs (a backend, an
environment, a prompt) changes the stage's version, an unrelated change does not; a model is its weights,
tokenizer and chat template."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sand import versioning
from sand.models.registry import model_hash, tiny_model
from sand.versioning import code_version, import_closure

ENGINE = Path(versioning.__file__).resolve().parent
STAGES = ("d0", "sampling", "critique", "synthesis", "finetune", "evaluation")
LOOP = ("sampling", "critique", "synthesis")
# The checkpoint folder's identity has a code version of its own: what sand.models.checkpoints.plan_training hashes.
CHECKPOINT_CODE = (("sand.training.sft", "sand.react"), True)

VERSIONS = """
import json, sys
from sand import versioning
calls = json.loads(sys.argv[1])
versions = {name: versioning.code_version(*modules, prompts=prompts) for name, (modules, prompts) in calls.items()}
print(json.dumps({"file": versioning.__file__, **versions}))
"""


@pytest.fixture(scope="module")
def calls():
    """What each stage's code version hashes (the arguments `stage_code` passes to `code_version`), and the
    checkpoint identity's: so an engine copy's interpreter computes them without importing the stages."""
    from sand import stages

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "code_version", lambda *modules, prompts=False: (modules, prompts))
        return {"checkpoint": CHECKPOINT_CODE, **{stage: stages.stage_code(stage) for stage in STAGES}}


@pytest.fixture(scope="module")
def engine_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    shutil.copytree(ENGINE, root / "sand", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def versions_in(root: Path, calls: dict) -> dict:
    """The stage code versions computed by the engine copy under `root` (in its own interpreter)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", VERSIONS, json.dumps(calls)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    versions = json.loads(result.stdout)
    assert Path(versions.pop("file")).is_relative_to(root)  # the copy ran, not the installed engine
    return versions


def edited(root: Path, module: str, change) -> None:
    path = root / module
    text = path.read_text()
    assert change(text) != text, module
    path.write_text(change(text))


def test_a_copy_of_the_engine_has_the_same_versions(engine_copy, calls):
    from sand import stages

    here = {stage: stages.stage_code(stage) for stage in STAGES}
    here["checkpoint"] = code_version(*CHECKPOINT_CODE[0], prompts=CHECKPOINT_CODE[1])
    assert versions_in(engine_copy, calls) == here  # versions depend on content, not on where the engine lives


def test_code_changes_invalidate_what_runs_them_and_nothing_else(engine_copy, calls):
    before = versions_in(engine_copy, calls)
    # A comment in the field reference's generator: no stage runs it.
    edited(engine_copy, "sand/docs.py", lambda text: text + "\n# reformatted\n")
    assert versions_in(engine_copy, calls) == before
    # The report (what an evaluation records besides its episodes): the evaluation stage runs it, no other stage.
    edited(engine_copy, "sand/report.py", lambda text: text.replace("SEED = 0", "SEED = 1"))
    after_report = versions_in(engine_copy, calls)
    assert [stage for stage in after_report if after_report[stage] != before[stage]] == ["evaluation"]
    # The writer's validator: the synthesis stage runs it; sampling and critique (upstream) do not.
    edited(engine_copy, "sand/sand_loop/synthesis.py", lambda text: text.replace("{1,300}", "{1,299}"))
    after_writer = versions_in(engine_copy, calls)
    assert [stage for stage in after_writer if after_writer[stage] != after_report[stage]] == ["synthesis"]
    before = after_writer
    # The transformers backend (reached through sand.models.backends): sampling and evaluation generate with it and
    # the finetune stage's runner imports sand.models; the training loads its model without it, so a trained
    # checkpoint stays valid.
    edited(engine_copy, "sand/models/backends/transformers.py",
           lambda text: text.replace("padding_side=\"left\"", "padding_side=\"right\""))
    after_backend = versions_in(engine_copy, calls)
    for stage in (*LOOP, "finetune", "evaluation"):
        assert after_backend[stage] != before[stage], stage
    assert after_backend["checkpoint"] == before["checkpoint"]
    # The experiment schema outside `train:` (an evaluation setting): no checkpoint is trained again...
    edited(engine_copy, "sand/experiment.py", lambda text: text.replace("pool_size: int = 8", "pool_size: int = 4"))
    after_schema = versions_in(engine_copy, calls)
    assert after_schema["checkpoint"] == after_backend["checkpoint"]
    # ...a training setting's default is one: it changes every checkpoint's identity.
    edited(engine_copy, "sand/training/config.py", lambda text: text.replace("lora_r: int = 16", "lora_r: int = 8"))
    after_train = versions_in(engine_copy, calls)
    assert after_train["checkpoint"] != after_schema["checkpoint"]
    # An environment module (the environments are opened by resources, outside the engine's imports).
    edited(engine_copy, "sand/envs/sciworld.py", lambda text: text + "\nLIMIT = 1\n")
    after_env = versions_in(engine_copy, calls)
    assert all(after_env[stage] != after_train[stage] for stage in ("critique", "evaluation"))
    # A prompt template (a data file of sand.prompts; training renders the agent's prompts from them too).
    edited(engine_copy, "sand/prompts/critique.txt", lambda text: text + "\n")
    after_prompt = versions_in(engine_copy, calls)
    assert all(after_prompt[stage] != after_env[stage] for stage in (*LOOP, "finetune", "evaluation", "checkpoint"))


def test_closure_follows_lazy_relative_and_by_name_imports(tmp_path):
    root = tmp_path / "engine"
    shutil.copytree(ENGINE, root / "sand", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "sand" / "extra").mkdir()
    (root / "sand" / "extra" / "__init__.py").write_text("")
    (root / "sand" / "extra" / "outer.py").write_text(
        "def run():\n    from .inner import value  # lazy, relative\n    return value, ['-m', 'sand.extra.child']\n")
    (root / "sand" / "extra" / "inner.py").write_text("from sand import errors\nvalue = 1\n")
    (root / "sand" / "extra" / "child.py").write_text("import torch\n")
    (root / "sand" / "extra" / "table.json").write_text("{}")
    script = ("import json; from sand.versioning import import_closure, code_version, _library_versions as libs; "
              "c = import_closure('sand.extra.outer'); "
              "print(json.dumps([sorted(c), code_version('sand.extra.outer'), sorted(libs(c))]))")
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}

    def run():
        result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    closure, version, libraries = run()
    assert closure == ["sand", "sand.errors", "sand.extra", "sand.extra.child", "sand.extra.inner",
                       "sand.extra.outer"]
    assert libraries == ["torch"]
    (root / "sand" / "extra" / "inner.py").write_text("from sand import errors\nvalue = 2\n")
    assert run()[1] != version
    version = run()[1]
    (root / "sand" / "extra" / "table.json").write_text('{"changed": true}')  # a data file beside the modules
    assert run()[1] != version


def test_versions_name_the_generating_libraries_installed():
    libraries = versioning._library_versions(import_closure("sand.training.sft", "sand.models.backends"))
    for name in ("torch", "transformers", "trl", "peft", "accelerate"):
        assert libraries[name] == f"{name}=={importlib.metadata.version(name)}"
    assert "vllm" in libraries  # its version, or "absent" where it is not installed
    assert versioning.library_version("no_such_library") == "absent"
    with pytest.raises(ValueError, match="sand.no_such_module"):
        import_closure("sand.no_such_module")


def test_model_identity_covers_tokenizer_and_chat_template(tmp_path):
    model = shutil.copytree(tiny_model(), tmp_path / "model")  # as saved by transformers: weights, tokenizer, template
    first = model_hash(model)
    (model / ".cache").mkdir()  # hidden files are not the model
    assert model_hash(model) == first

    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    templated = model_hash(model)
    assert templated != first

    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] += "x"
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert model_hash(model) not in (first, templated)
