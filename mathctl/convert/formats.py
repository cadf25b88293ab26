"""Format names, dtypes and the tensor index every checkpoint source exposes (`Entry`, `Source`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mathctl.core.errors import ConfigError

FROM_FORMATS = ("hf", "dcp", "fsdp", "torch", "lora", "gguf", "verl", "olmo", "instella")
TO_FORMATS = ("hf", "dcp", "torch", "olmo", "instella")
OLMO_NAMES = ("olmo", "instella")  # one layout: Instella's OLMo-style unsharded model.pt
DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
WRAPPERS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
DROPPABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / a byte count -> bytes (GB = 10^9, as Hugging Face counts)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ConfigError(f"cannot read the size '{text}'", hint="write e.g. 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size < 1:
        raise ConfigError(f"shard size '{text}' is below one byte", hint="e.g. --shard-size 5GB")
    return size


# --- tensors in a source ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Source:
    """Tensors by name (`entries`) and a way to read a group of them."""

    kind: str
    path: Path
    entries: dict[str, Entry]
    reader: Callable[[list[str]], dict[str, torch.Tensor]]
    model_dir: str | None = None  # where config / tokenizer / generation config can come from
    notes: list[str] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # {"scale": float, "fan_in_fan_out": bool} when peft names are present
    gguf: dict[str, Any] | None = None  # a GGUF source: architecture and the file's own tensors (--dry-run)
    prepare: Callable[[], None] | None = None  # called once before anything is written
    staged: Path | None = None  # a temporary folder (model_dir) removed when the conversion ends
    origins: dict[str, list[str]] | None = None  # a renaming view: its key -> the stored names it is made of

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return self.reader(keys)
