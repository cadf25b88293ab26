"""Instella's own checkpoint layout (`convert-ckpt --from olmo` / `--to olmo`, alias `instella`).

The Instella training code (AMD-AIG-AIMA/Instella, a fork of the OLMo codebase) saves an unsharded
checkpoint as a folder with `model.pt` (a plain state dict) and `config.yaml` (the training config, whose
`model:` section describes the network). Its names are OLMo's, with fused projections:

    OLMo-style (model.pt)                     Hugging Face Instella (InstellaForCausalLM)
    transformer.wte.weight                    model.embed_tokens.weight
    transformer.blocks.N.att_proj.weight      model.layers.N.self_attn.{q,k,v}_proj.weight  (rows: q, then k, then v)
    transformer.blocks.N.attn_out.weight      model.layers.N.self_attn.o_proj.weight
    transformer.blocks.N.q_norm.weight        model.layers.N.self_attn.q_norm.weight
    transformer.blocks.N.k_norm.weight        model.layers.N.self_attn.k_norm.weight
    transformer.blocks.N.ff_proj.weight       model.layers.N.mlp.{up,gate}_proj.weight      (rows: up, then gate)
    transformer.blocks.N.ff_out.weight        model.layers.N.mlp.down_proj.weight
    transformer.blocks.N.attn_norm.weight     model.layers.N.pre_attention_layernorm.weight
    transformer.blocks.N.ff_norm.weight       model.layers.N.pre_feedforward_layernorm.weight
    transformer.ln_f.weight                   model.norm.weight
    transformer.ff_out.weight                 lm_head.weight                                (absent when tied)

The up-then-gate order follows OLMo's SwiGLU (`x, gate = x.chunk(2, dim=-1)`: the first half is the
input, the second the gate). Splits are by rows only, so both directions are bit-exact.

Covered: Instella's sequential block with RMS norms, QK-norm, SwiGLU, no biases, tied or untied head,
grouped-query attention (k and v of `n_kv_heads * head_dim` rows), and `block_groups.G.I` names (the
`block_group_size` option) read back as plain blocks. Not covered: OLMo 1/2's own Hugging Face classes
(`OlmoForCausalLM`, `Olmo2ForCausalLM` have other norm names and placements), biases, LayerNorm,
the "llama" block type, and sharded (un-unsharded) Instella checkpoints.

transformers has no Instella class: the Hugging Face side is a folder of safetensors plus a config.json
with `model_type: instella`; its names and shapes are derived here from the config (`hf_layout`) rather
than from a model built on the meta device, so no remote code runs.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mathctl.core.errors import CheckpointError, ConfigError

# keys that make a config.json an Instella one
MODEL_TYPE = "instella"


@dataclass(frozen=True)
class Dims:
    """The sizes the name mapping needs (everything else in a config is carried, not used)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    intermediate: int  # per half of the fused ff_proj: the HF `intermediate_size`
    vocab: int  # rows of the embedding (OLMo's `embedding_size` when set)
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_rows(self) -> int:
        return self.n_kv_heads * self.head_dim


def _positive(values: dict[str, Any], where: str) -> None:
    bad = [f"{k}={v!r}" for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} (expected positive integers)",
                          hint="check the model sizes in that config")


def dims_from_hf(config: dict[str, Any], where: str) -> Dims:
    """Dims of a Hugging Face Instella config.json (as a dict)."""
    need = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    absent = [k for k in need if config.get(k) is None]
    if absent:
        raise ConfigError(f"{where} lacks {', '.join(absent)}, which an Instella config needs",
                          hint="give --base-model with the Instella model's config.json")
    heads = config["num_attention_heads"]
    dims = {"hidden_size": config["hidden_size"], "num_attention_heads": heads,
            "num_key_value_heads": config.get("num_key_value_heads") or heads,
            "num_hidden_layers": config["num_hidden_layers"], "intermediate_size": config["intermediate_size"],
            "vocab_size": config["vocab_size"]}
    _positive(dims, where)
    if dims["hidden_size"] % heads or heads % dims["num_key_value_heads"]:
        raise ConfigError(f"{where}: hidden_size {dims['hidden_size']}, {heads} heads and "
                          f"{dims['num_key_value_heads']} key/value heads do not divide evenly",
                          hint="check the config's sizes")
    if config.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias is true; the Instella layout converted here has no biases")
    return Dims(dims["hidden_size"], heads, dims["num_key_value_heads"], dims["num_hidden_layers"],
                dims["intermediate_size"], dims["vocab_size"], bool(config.get("tie_word_embeddings", False)))


def _olmo_model_section(config_yaml: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(config_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {config_yaml} ({type(exc).__name__})", hint="is it Instella's config.yaml?") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{config_yaml} has no `model:` section", hint="point at the config.yaml the Instella trainer wrote")
    return model


# Instella's ModelConfig defaults (instella/config.py) for keys a config.yaml may leave out
OLMO_DEFAULTS: dict[str, Any] = {
    "n_kv_heads": None, "mlp_ratio": 4, "mlp_hidden_size": None, "activation_type": "swiglu",
    "block_type": "sequential", "block_group_size": 1, "alibi": False, "rope": False, "multi_query_attention": None,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "include_bias": True, "scale_logits": False, "max_sequence_length": 1024,
    "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True, "eos_token_id": 50256,
    "pad_token_id": 50256, "attention_dropout": 0.1,
}
# what InstellaForCausalLM computes; Instella's trainer has no setting for either
RMS_EPS, ROPE_THETA = 1e-5, 10000.0


def with_defaults(model: dict[str, Any]) -> dict[str, Any]:
    return {**OLMO_DEFAULTS, **model}


def dims_from_olmo(model: dict[str, Any], where: str) -> Dims:
    """Dims of an Instella/OLMo `config.yaml` `model:` section (defaults filled in as Instella's
    ModelConfig fills them), refusing what the Hugging Face Instella class cannot hold."""
    if any(model.get(k) is None for k in ("d_model", "n_heads", "n_layers")):
        raise ConfigError(f"{where}: model.d_model, model.n_heads and model.n_layers are required",
                          hint="point at the config.yaml the Instella trainer wrote")
    cfg = with_defaults(model)
    wanted = {"block_type": "sequential", "activation_type": "swiglu", "layer_norm_type": "rms",
              "attention_layer_norm": True, "layer_norm_with_affine": True, "attention_layer_norm_with_affine": True,
              "include_bias": False, "alibi": False, "rope": True, "scale_logits": False}
    problems = [f"model.{key} is {cfg[key]!r} (Hugging Face Instella needs {value!r})"
                for key, value in wanted.items() if cfg[key] != value]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems),
                          hint="only Instella's architecture (sequential blocks, RMS norms with weights, QK-norm, "
                               "SwiGLU, RoPE, no biases) maps onto InstellaForCausalLM")
    d_model, n_heads = cfg["d_model"], cfg["n_heads"]
    n_kv = 1 if cfg["multi_query_attention"] else (cfg["n_kv_heads"] or n_heads)
    hidden = cfg["mlp_hidden_size"] or int(cfg["mlp_ratio"] * d_model)
    vocab = cfg["embedding_size"] or cfg["vocab_size"]  # the embedding is padded to embedding_size
    sizes = {"d_model": d_model, "n_heads": n_heads, "n_kv_heads": n_kv, "n_layers": cfg["n_layers"],
             "mlp_hidden_size": hidden, "embedding_size/vocab_size": vocab}
    _positive(sizes, where)
    if hidden % 2 or d_model % n_heads or n_heads % n_kv:
        raise ConfigError(f"{where}: mlp_hidden_size {hidden} must be even and d_model {d_model}, {n_heads} heads "
                          f"and {n_kv} key/value heads must divide evenly", hint="check the config's sizes")
    return Dims(d_model, n_heads, n_kv, cfg["n_layers"], hidden // 2, vocab, bool(cfg["weight_tying"]))


def hf_config_from_olmo(model: dict[str, Any], dims: Dims) -> dict[str, Any]:
    """A Hugging Face Instella config.json from the `model:` section (the fields Instella's own converter
    sets, with the key/value head count kept, which that converter overwrites with n_heads)."""
    cfg = with_defaults(model)
    return {
        "architectures": ["InstellaForCausalLM"], "model_type": MODEL_TYPE,
        "hidden_size": dims.d_model, "intermediate_size": dims.intermediate,
        "num_attention_heads": dims.n_heads, "num_key_value_heads": dims.n_kv_heads,
        "num_hidden_layers": dims.n_layers, "vocab_size": dims.vocab,
        "max_position_embeddings": cfg["max_sequence_length"], "tie_word_embeddings": dims.tied,
        "pad_token_id": cfg["pad_token_id"], "eos_token_id": cfg["eos_token_id"],
        "bos_token_id": cfg["eos_token_id"],  # Instella has no BOS token; its converter uses EOS
        "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": cfg["attention_dropout"], "use_cache": True,
        "initializer_range": 0.02,
    }


def olmo_model_from_hf(config: dict[str, Any], dims: Dims) -> dict[str, Any]:
    """The `model:` section of an Instella config.yaml describing a Hugging Face Instella config."""
    return {
        "d_model": dims.d_model, "n_heads": dims.n_heads, "n_kv_heads": dims.n_kv_heads, "n_layers": dims.n_layers,
        "mlp_hidden_size": 2 * dims.intermediate, "weight_tying": dims.tied,
        "vocab_size": dims.vocab, "embedding_size": dims.vocab,
        "max_sequence_length": config.get("max_position_embeddings", 4096),
        "rope": True, "alibi": False, "flash_attention": False,
        "attention_layer_norm": True, "attention_layer_norm_with_affine": True, "multi_query_attention": False,
        "include_bias": False, "block_type": "sequential", "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "activation_type": "swiglu", "scale_logits": False,
        "attention_dropout": config.get("attention_dropout", 0.0),
        "residual_dropout": 0.0, "embedding_dropout": 0.0,
        "eos_token_id": config.get("eos_token_id", 0), "pad_token_id": config.get("pad_token_id", 1),
        "init_device": "meta",
    }


# --- the name mapping ------------------------------------------------------------------------


def pairs(dims: Dims) -> list[tuple[str, list[tuple[str, int]]]]:
    """(OLMo name, [(HF name, rows), ...]): each OLMo tensor is its HF parts stacked along dim 0."""
    d, kv, inter = dims.d_model, dims.kv_rows, dims.intermediate
    out: list[tuple[str, list[tuple[str, int]]]] = [("transformer.wte.weight", [("model.embed_tokens.weight", dims.vocab)])]
    for i in range(dims.n_layers):
        olmo, hf = f"transformer.blocks.{i}.", f"model.layers.{i}."
        out += [
            (olmo + "att_proj.weight", [(hf + "self_attn.q_proj.weight", d), (hf + "self_attn.k_proj.weight", kv),
                                        (hf + "self_attn.v_proj.weight", kv)]),
            (olmo + "attn_out.weight", [(hf + "self_attn.o_proj.weight", d)]),
            (olmo + "q_norm.weight", [(hf + "self_attn.q_norm.weight", d)]),
            (olmo + "k_norm.weight", [(hf + "self_attn.k_norm.weight", kv)]),
            (olmo + "ff_proj.weight", [(hf + "mlp.up_proj.weight", inter), (hf + "mlp.gate_proj.weight", inter)]),
            (olmo + "ff_out.weight", [(hf + "mlp.down_proj.weight", d)]),
            (olmo + "attn_norm.weight", [(hf + "pre_attention_layernorm.weight", d)]),
            (olmo + "ff_norm.weight", [(hf + "pre_feedforward_layernorm.weight", d)]),
        ]
    out.append(("transformer.ln_f.weight", [("model.norm.weight", d)]))
    if not dims.tied:
        out.append(("transformer.ff_out.weight", [("lm_head.weight", dims.vocab)]))
    return out


def _columns(name: str, dims: Dims) -> tuple[int, ...]:
    """Trailing shape of a tensor (everything but the rows): norms are 1-D, ff_out/down_proj read the
    intermediate size, every other matrix reads d_model."""
    if name.endswith(("norm.weight", "ln_f.weight")):
        return ()
    if name.endswith("down_proj.weight") or (".blocks." in name and name.endswith(".ff_out.weight")):
        return (dims.intermediate,)
    return (dims.d_model,)


def olmo_layout(dims: Dims) -> dict[str, tuple[int, ...]]:
    return {olmo: (sum(rows for _, rows in parts), *_columns(olmo, dims)) for olmo, parts in pairs(dims)}


def hf_layout(dims: Dims) -> dict[str, tuple[int, ...]]:
    return {hf: (rows, *_columns(hf, dims)) for _, parts in pairs(dims) for hf, rows in parts}


_GROUPED = re.compile(r"^transformer\.block_groups\.(\d+)\.(\d+)\.(.+)$")


def plain_olmo_names(names: dict[str, str]) -> dict[str, str]:
    """source key -> OLMo name, from names with wrapper segments already removed: an extra leading
    `model.` dropped and `block_groups.G.I.` (Instella's `block_group_size` option) written `blocks.N.`."""
    names = {k: (n[len("model."):] if n.startswith("model.transformer.") else n) for k, n in names.items()}
    group_size = len({m.group(2) for n in names.values() if (m := _GROUPED.match(n)) and m.group(1) == "0"})
    for key, name in names.items():
        match = _GROUPED.match(name)
        if match:
            names[key] = f"transformer.blocks.{int(match.group(1)) * group_size + int(match.group(2))}.{match.group(3)}"
    return names


def _listing(items: list[str]) -> str:
    return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def _check_names(found: dict[str, tuple[int, ...]], layout: dict[str, tuple[int, ...]], where: str, hint: str) -> None:
    """Exactly the layout's names, with its shapes, or one error naming what is wrong."""
    missing = [n for n in layout if n not in found]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} Instella tensors: {_listing(missing)}", hint=hint)
    unexpected = sorted(n for n in found if n not in layout)
    if unexpected:
        raise CheckpointError(f"{where} holds {len(unexpected)} tensors the Instella layout does not have: "
                              f"{_listing(unexpected)}",
                              hint="biases, LayerNorm and the llama block type are not converted; check the config")
    wrong = [f"{n}: {list(found[n])}, config {list(s)}" for n, s in layout.items() if tuple(found[n]) != s]
    if wrong:
        raise CheckpointError(f"{where}: {len(wrong)} tensors do not have the shapes the config gives: {_listing(wrong)}",
                              hint="the config (config.yaml or --base-model's config.json) describes another model size")


def split_plan(shapes: dict[str, tuple[int, ...]], dims: Dims, where: str) -> dict[str, tuple[str, int, int]]:
    """OLMo -> Hugging Face: for each HF name, (OLMo name, first row, rows) of the tensor it is cut from.
    `shapes` maps OLMo names (see `plain_olmo_names`) to shapes; they must match the layout exactly."""
    _check_names(shapes, olmo_layout(dims), where,
                 hint="is it an unsharded Instella/OLMo model.pt of the model its config describes? unshard a "
                      "sharded checkpoint with the Instella code first")
    cut: dict[str, tuple[str, int, int]] = {}
    for olmo, parts in pairs(dims):
        start = 0
        for hf, rows in parts:
            cut[hf] = (olmo, start, rows)
            start += rows
    return cut


def join_plan(shapes: dict[str, tuple[int, ...]], dims: Dims, where: str) -> dict[str, list[str]]:
    """Hugging Face -> OLMo: for each OLMo name, the HF names stacked (by rows, in order) to make it."""
    if dims.tied:  # a tied head saved anyway is the embedding again
        shapes = {n: s for n, s in shapes.items() if n != "lm_head.weight"}
    _check_names(shapes, hf_layout(dims), where,
                 hint="is SRC a Hugging Face Instella model (model_type instella) of the size its config gives?")
    return {olmo: [hf for hf, _ in parts] for olmo, parts in pairs(dims)}


# --- which config describes an OLMo-style checkpoint ----------------------------------------


def read_json_config(folder: str | Path | None) -> dict[str, Any] | None:
    """config.json of a local folder as a dict, or None."""
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_instella_config(folder: str | Path | None) -> bool:
    config = read_json_config(folder)
    return config is not None and config.get("model_type") == MODEL_TYPE


def olmo_checkpoint_config(folder: Path, base_model: str | None) -> tuple[Dims, dict[str, Any], str | None, str]:
    """(dims, HF config dict, a model folder holding that config.json or None, a note) for the
    checkpoint in `folder`: --base-model's config.json, else an Instella config.json beside model.pt,
    else the `model:` section of config.yaml (turned into a config.json that still has to be written)."""
    if base_model is not None:
        config = read_json_config(base_model)
        if config is None or config.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"--base-model {base_model} is not a local Hugging Face Instella folder "
                              "(config.json with model_type instella)",
                              hint="give a local copy of the Instella model (e.g. amd/Instella-3B) or leave "
                                   "--base-model out to use config.yaml")
        return dims_from_hf(config, f"{base_model}/config.json"), config, base_model, f"sizes from {base_model}/config.json"
    config = read_json_config(folder)
    if config is not None and config.get("model_type") == MODEL_TYPE:
        return dims_from_hf(config, f"{folder}/config.json"), config, str(folder), "sizes from config.json beside model.pt"
    if (folder / "config.yaml").is_file():
        model = _olmo_model_section(folder / "config.yaml")
        dims = dims_from_olmo(model, str(folder / "config.yaml"))
        return dims, hf_config_from_olmo(model, dims), None, \
            "config.json made from config.yaml (no tokenizer unless its files sit beside model.pt; give " \
            "--base-model for the released model's tokenizer and code)"
    raise ConfigError(f"{folder} has no config.yaml (or Instella config.json) beside model.pt",
                      hint="the sizes are needed to split the fused tensors: give --base-model with the Hugging "
                           "Face Instella folder, or put the run's config.yaml next to model.pt")


# --- expected model and side files -----------------------------------------------------------


class InstellaConfigFile(dict):
    """An Instella config.json carried as it is (auto_map and all) through the writers, which call
    `save_pretrained` and set `dtype`; a dict, so GenerationConfig.from_model_config reads it too.
    transformers has no Instella config class, and nothing is registered with AutoConfig."""

    dtype: torch.dtype | None = None

    def save_pretrained(self, folder: str | Path) -> None:
        data = dict(self)
        if self.dtype is not None:
            name = str(self.dtype).replace("torch.", "")
            keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["torch_dtype"]  # both transformers 4 and 5 read it
            data.update({k: name for k in keys})
        (Path(folder) / "config.json").write_text(json.dumps(data, indent=2) + "\n")


def expected_instella(model_dir: str) -> tuple[InstellaConfigFile, dict[str, tuple[int, ...]], dict[str, str]]:
    """(config, name -> shape, tied aliases) of an Instella folder, from its config.json alone."""
    raw = read_json_config(model_dir) or {}
    dims = dims_from_hf(raw, f"{model_dir}/config.json")
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if dims.tied else {}
    return InstellaConfigFile(raw), hf_layout(dims), tied


def copy_remote_code(model_dir: str | None, out: Path) -> list[str]:
    """The modelling files a config's `auto_map` names (InstellaForCausalLM's code), so the output
    loads with `trust_remote_code=True` as the source did."""
    config = read_json_config(model_dir)
    if not config or not isinstance(config.get("auto_map"), dict):
        return []
    copied = []
    for ref in config["auto_map"].values():
        for item in ref if isinstance(ref, list) else [ref]:
            if not isinstance(item, str) or "--" in item:  # "repo--module.Class" points at another repo
                continue
            name = item.rsplit(".", 1)[0] + ".py"
            path = Path(model_dir) / name  # type: ignore[arg-type]
            if path.is_file() and not (out / name).exists():
                shutil.copy2(path, out / name)
                copied.append(name)
    return copied


def write_olmo_side_files(out: Path, model_dir: str | None, dims: Dims, tokenizer_files: tuple[str, ...]) -> list[str]:
    """config.yaml (the `model:` section Instella's trainer reads) plus the Hugging Face config.json,
    generation config, tokenizer files and remote code, so `--from olmo` finds them again."""
    import yaml

    config = read_json_config(model_dir) or {}
    (out / "config.yaml").write_text(yaml.safe_dump({"model": olmo_model_from_hf(config, dims)}, sort_keys=False))
    written = ["config.yaml"]
    if model_dir is None or not Path(model_dir).is_dir():
        return written
    for name in ("config.json", "generation_config.json", *tokenizer_files):
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, out / name)
            written.append(name)
    return written + copy_remote_code(model_dir, out)
