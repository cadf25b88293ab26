"""`mathctl convert-ckpt`: checkpoints between PyTorch DCP, `.pt` state dicts, mathctl's FSDP run
checkpoints, LoRA adapters and Hugging Face folders.

    mathctl convert-ckpt SRC DST [--from hf|dcp|fsdp|torch|lora|gguf|verl|olmo] [--to hf|dcp|torch|olmo]
                         [--base-model M]

Sources (`--from`, detected when left out):
    hf     a Hugging Face folder: model.safetensors, or shards + model.safetensors.index.json
    dcp    a `torch.distributed.checkpoint` folder (`.metadata` + `*.distcp`), e.g. NeMo RL's
           `weights/`; a top-level `model.` group beside optimiser state is unwrapped
    fsdp   a mathctl sft/rm/grpo run folder (its newest complete checkpoint) or one
           `checkpoints/step_N/` folder, written by any number of FSDP ranks: DCP underneath, with the
           run's LoRA adapters merged and config/tokenizer taken from the run
    torch  a `.pt`/`.bin`/`.pth` state dict (loaded with `weights_only=True`, memory-mapped), also
           nested under `state_dict`/`model`/`module`
    lora   a peft adapter folder (adapter_config.json + adapter_model.safetensors) merged into its
           base (`--base-model`, default the adapter's `base_model_name_or_path`)
    gguf   a llama.cpp `.gguf` file (detected by its extension or its `GGUF` magic bytes), read
           by transformers' GGUF loader and dequantised to float32; config, generation config and
           tokenizer (with its chat template) are rebuilt from the file's metadata
    verl   a verl/SkyRL FSDP actor folder: one `model_world_size_W_rank_R.pt` per rank (DTensor shards,
           loaded weights-only), `fsdp_config.json`, `huggingface/`; LoRA merged (`verl.py`)
    olmo   (alias instella) Instella's unsharded OLMo-style `model.pt` + `config.yaml`, seen under
           Hugging Face Instella names with fused q/k/v and up/gate split (`instella.py`)

Targets (`--to`): hf (default), dcp, torch (one `.pt`), and olmo/instella, which fuses a Hugging Face
Instella model back into Instella's `model.pt` + `config.yaml`.

Key surgery (every source): wrapper segments that training code inserts are removed anywhere in a
name (`_fsdp_wrapped_module.`, `_orig_mod.` from torch.compile, `_checkpoint_wrapped_module.`,
leading `module.` from DDP), then the `model.` prefix is added or removed, whichever matches the
model the config describes; a tied output embedding (`lm_head.weight` sharing the input embedding)
is written once, as `save_pretrained` does; stale `rotary_emb.inv_freq` buffers are dropped. Of a
peft `modules_to_save` module (a reward model's `score` head), which a LoRA state dict holds as
`original_module` and as the trained `modules_to_save.default`, the trained copy is written (see
`_copy_rank`; an adapter folder's copy likewise replaces the base's).

Checks: with a config (the source's, or `--base-model`'s) the names and shapes are compared with
the model it builds on the meta device; missing names (unless `--allow-missing`), unexpected names
and shape mismatches are listed and exit 2. After writing, every output file is read back and
each tensor's count and CRC-32 checksum compared with what was written.

Memory: HF and DCP outputs are written in groups of at most `--shard-size` bytes, read from the
source group by group (DCP: one `dcp.load` per group, which reads only those tensors' byte ranges;
safetensors and `.pt` are memory-mapped), so the peak stays near one output shard plus the largest
tensor whatever the model size. A `.pt` output is one pickle and needs the whole state in memory,
and a GGUF source is dequantised whole (the float32 model is in memory while it is written).
"""


from __future__ import annotations

from mathctl.convert.formats import DTYPES, FROM_FORMATS, TO_FORMATS, Entry, Source, parse_size
from mathctl.convert.gguf import read_gguf_header
from mathctl.convert.plan import Plan, make_plan, strip_wrappers
from mathctl.convert.sources import detect_format, open_source
from mathctl.convert.write import Result, convert, iter_mapping_rows

__all__ = ["DTYPES", "FROM_FORMATS", "TO_FORMATS", "Entry", "Plan", "Result", "Source", "convert", "detect_format",
           "iter_mapping_rows", "make_plan", "open_source", "parse_size", "read_gguf_header", "strip_wrappers"]
