"""llama.cpp GGUF sources: header metadata, and dequantisation through transformers' GGUF loader."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from mathctl.convert.formats import Entry, Source
from mathctl.convert.plan import expected_model
from mathctl.core.errors import CheckpointError, ConfigError

GGUF_MAGIC = b"GGUF"


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_value(reader: Any, name: str) -> Any:
    """A scalar or string metadata value of a GGUF file (None when absent)."""
    item = reader.fields.get(name)
    if item is None or not item.data:
        return None
    part = item.parts[item.data[0]]
    if item.types and int(item.types[0]) == 8:  # GGUFValueType.STRING
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if len(part) == 1 else part.tolist()


def read_gguf_header(path: Path) -> dict[str, Any]:
    """Architecture, a few metadata values and the tensor list of a GGUF file (memory-mapped: no tensor
    data is read). Shapes are in PyTorch order (GGUF stores the innermost dimension first)."""
    if not _has_gguf_magic(path):
        with path.open("rb") as f:
            head = f.read(4)
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})",
                              hint="give a llama.cpp .gguf model file, or name the format of SRC with --from")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("reading GGUF files needs the gguf package", hint="pip install 'gguf>=0.10'") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file
        raise CheckpointError(f"cannot read the GGUF file {path} ({type(exc).__name__}: {exc})",
                              hint="the file may be cut short; download it again") from None
    tensors = [{"name": t.name, "shape": [int(n) for n in reversed(t.shape.tolist())], "type": t.tensor_type.name,
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    types: dict[str, int] = {}
    for t in tensors:
        types[t["type"]] = types.get(t["type"], 0) + 1
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    header = {"file": str(path), "architecture": _gguf_value(reader, "general.architecture"),
              "name": _gguf_value(reader, "general.name"), "tensor_types": types,
              "vocab": len(tokens.data) if tokens is not None else None, "tensors": tensors,
              "special_tokens": {key: _gguf_value(reader, f"tokenizer.ggml.{key}_token_id")
                                 for key in ("bos", "eos", "padding")}}
    del reader  # closes the memory map
    if not header["architecture"]:
        raise CheckpointError(f"{path} names no general.architecture", hint="is the file a model GGUF (not a LoRA or vocab-only file)?")
    return header


def _gguf_architectures() -> list[str]:
    """The GGUF architectures this transformers reads (its two loaders' lists; empty if it moved them)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _gguf_quiet():
    """transformers' GGUF loader draws a tqdm bar per file and logs per tensor: keep stderr clean."""
    import contextlib
    import io

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _open_gguf(src: Path, base_model: str | None) -> Source:
    """A GGUF file: the config comes from its metadata (staged as config.json in a temporary folder,
    with generation_config.json; the tokenizer is added there before writing), the tensors from
    transformers' loader, dequantised to float32 once, on the first read."""
    import tempfile

    import transformers
    from transformers import AutoConfig

    file = src
    if src.is_dir():
        files = sorted(src.glob("*.gguf"))
        if len(files) != 1:
            raise CheckpointError(f"{src} holds {len(files)} .gguf files; one is expected", hint="point SRC at the file itself")
        file = files[0]
    header = read_gguf_header(file)
    arch = header["architecture"]
    try:
        with _gguf_quiet():
            config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        known = _gguf_architectures()
        raise CheckpointError(f"transformers {transformers.__version__} cannot read GGUF architecture '{arch}' ({reason})",
                              hint=("architectures it reads: " + ", ".join(known)) if known else
                              "convert the original Hugging Face checkpoint instead") from None
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if getattr(config, attr, None) is None and header["special_tokens"][key] is not None:
            setattr(config, attr, header["special_tokens"][key])
    config.dtype = torch.float32  # what the dequantised weights are; --dtype casts them
    if not getattr(config, "architectures", None):  # GGUF metadata names none; vLLM and `expected_model` need it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    if hasattr(config, "_model_name_or_path"):  # transformers files general.name ("Smollm2 135M ...") as a path
        del config._model_name_or_path
    stage = Path(tempfile.mkdtemp(prefix="mathctl-gguf-"))
    try:
        config.save_pretrained(stage)
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(stage)
        expected = expected_model(str(stage), False)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    assert expected is not None
    entries = {name: Entry(name, e.shape, torch.float32 if e.dtype.is_floating_point else e.dtype)
               for name, e in expected[1].items()}
    state: dict[str, torch.Tensor] = {}

    def load() -> None:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {}
        if hasattr(transformers, "GgufConfig"):  # plain dense layers whatever GGUF kernels are installed
            kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
        with _gguf_quiet():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(file.parent), gguf_file=file.name, config=config, dtype=torch.float32, output_loading_info=True,
                **kwargs)
        missing = [k for k in info.get("missing_keys", ()) if k in entries]
        if missing:
            raise CheckpointError(f"{file}: {len(missing)} tensors of {type(model).__name__} were not found in the "
                                  f"GGUF file: {', '.join(sorted(missing)[:5])}",
                                  hint="the file's tensor names do not match what transformers expects of this architecture")
        state.update(model.state_dict())

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        if not state:
            load()
        return {key: state[key] for key in keys}

    def prepare() -> None:  # the tokenizer (vocabulary, merges, special tokens, chat template) from the metadata
        from transformers import AutoTokenizer

        with _gguf_quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        limit = getattr(config, "max_position_embeddings", None)
        if limit:  # the GGUF names none: the tokenizer would claim an unbounded context
            tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = limit
        for key in ("is_local", "local_files_only"):  # loading arguments, not tokenizer settings
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(stage)

    notes = [f"GGUF {arch} ({header['name'] or file.name}): {len(header['tensors'])} tensors "
             f"({', '.join(f'{n} {t}' for t, n in sorted(header['tensor_types'].items(), key=lambda x: -x[1]))}), "
             f"dequantised to float32"]
    if base_model:
        notes.append("--base-model is not used for a GGUF source: config and tokenizer come from the file")
    return Source("gguf", file, entries, read, model_dir=str(stage), notes=notes, gguf=header, prepare=prepare,
                  staged=stage)
