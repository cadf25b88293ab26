"""`mathctl convert-ckpt --from verl` and `--from/--to olmo` (Instella): real verl-layout checkpoints
written by 2 gloo processes with FSDP2, an HSDP (2-D mesh) save, a one-process plain save and a LoRA
run, each converted and compared bit for bit; Instella round trips in both directions; bad input as
one error line with exit 2."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mathctl.convert import convert
from mathctl.core.errors import CheckpointError, ConfigError

# --- verl -------------------------------------------------------------------------------------

# Writes verl's actor layout the way verl's FSDPCheckpointManager does: every rank
# torch.save(model.state_dict()) of an FSDP2 (fully_shard) model, rank 0 fsdp_config.json and
# huggingface/; a LoRA run adds lora_adapter/adapter_config.json. Rank 0 also saves the expected full
# state dicts (the model before sharding; peft's merge_and_unload of the LoRA model). The main process
# then writes an HSDP checkpoint (mesh 2x2, (Replicate, Shard(0))) for world size 4 one rank at a time
# over torch's fake process group, with each shard cut where DTensor's own arithmetic puts it.
WRITER = r'''
import copy, json, os, shutil, sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def tiny_config(model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config.vocab_size |= 1  # odd: the embedding rows split unevenly over 2 ranks, as torch.chunk splits them
    return config


def tiny_model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the same weights on every rank
    return AutoModelForCausalLM.from_config(tiny_config(model_dir), dtype=torch.float32)


def side_files(model_dir, folder, world):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
    hf = folder / "huggingface"
    hf.mkdir(exist_ok=True)
    for path in Path(model_dir).iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, hf / path.name)
    tiny_config(model_dir).save_pretrained(hf)


def shard(model, mesh, layers):
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def worker(rank, world, port, model_dir, out):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    full = out / "full"
    model = tiny_model(model_dir)
    if rank == 0:
        side_files(model_dir, full, world)
        torch.save(model.state_dict(), out / "full_expected.pt")
    shard(model, mesh, model.model.layers)
    dist.barrier()
    torch.save(model.state_dict(), full / f"model_world_size_{world}_rank_{rank}.pt")

    base = tiny_model(model_dir)
    torch.manual_seed(1)  # the same adapter on every rank
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    lora_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in lora_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give it weight so the merge matters
                param.normal_(0, 0.05)
    lora = out / "lora"
    if rank == 0:
        side_files(model_dir, lora, world)
        merged = copy.deepcopy(lora_model).merge_and_unload()
        torch.save(merged.state_dict(), out / "lora_expected.pt")
        (lora / "lora_adapter").mkdir()
        saved = lora_model.peft_config["default"].to_dict()
        (lora / "lora_adapter" / "adapter_config.json").write_text(
            json.dumps(saved, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    shard(lora_model, mesh, lora_model.base_model.model.model.layers)
    dist.barrier()
    torch.save(lora_model.state_dict(), lora / f"model_world_size_{world}_rank_{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def hsdp(model_dir, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore

    state = torch.load(out / "full_expected.pt", weights_only=True)
    folder = out / "hsdp"
    side_files(model_dir, folder, 4)
    placements = [Replicate(), Shard(0)]
    for rank in range(4):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ddp", "fsdp"))
        local = {}
        for key, value in state.items():
            shape, offset = compute_local_shape_and_global_offset(value.shape, mesh, placements)
            piece = value[tuple(slice(o, o + s) for o, s in zip(offset, shape))].clone()
            local[key] = DTensor.from_local(piece, mesh, placements, run_check=False, shape=value.shape,
                                            stride=value.stride())
        torch.save(local, folder / f"model_world_size_4_rank_{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    model_dir, out, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    mp.spawn(worker, args=(2, port, model_dir, out), nprocs=2)
    hsdp(model_dir, out)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def verl_checkpoints(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verl")
    script = out / "write_verl.py"
    script.write_text(WRITER)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model), str(out), str(_free_port())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # a one-GPU save: plain tensors, world size 1
    single = out / "single"
    single.mkdir()
    shutil.copytree(out / "full" / "huggingface", single / "huggingface")
    (single / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    torch.save(torch.load(out / "full_expected.pt", weights_only=True), single / "model_world_size_1_rank_0.pt")
    return out


def _loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("layout", ["full", "hsdp", "single"])
def test_verl_checkpoint_converts_bit_exact(verl_checkpoints, tmp_path, layout):
    summary = convert(verl_checkpoints / layout, tmp_path / "hf", progress_bar=False)  # format detected
    assert summary["from"] == "verl" and summary["verified"]
    note = summary["notes"][0]
    assert {"full": "mesh [2] ('fsdp',)", "hsdp": "mesh [2, 2] ('ddp', 'fsdp')", "single": "no device mesh"}[layout] in note
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    _assert_bit_exact(_loaded_state(tmp_path / "hf"), torch.load(verl_checkpoints / "full_expected.pt", weights_only=True))


def test_a_global_step_folder_finds_verl_actor_or_skyrl_policy(verl_checkpoints, tmp_path):
    for sub in ("actor", "policy"):
        step = tmp_path / sub / "global_step_5"
        shutil.copytree(verl_checkpoints / "single", step / sub)
        summary = convert(step, tmp_path / f"out-{sub}", progress_bar=False)
        assert summary["from"] == "verl" and f"global_step_5/{sub}" in summary["notes"][0]


def test_verl_fixture_holds_uneven_dtensor_shards(verl_checkpoints):
    """The fixture is what the tests claim: every value a DTensor shard, the odd vocabulary split 2 ways
    unevenly (torch.chunk sizes: the first rank holds one row more)."""
    from mathctl.convert.verl import _load_rank

    ranks = [_load_rank(verl_checkpoints / "full" / f"model_world_size_2_rank_{r}.pt") for r in (0, 1)]
    for key, value in ranks[0].items():
        assert type(value).__name__ == "DTensor", key
        assert sum(r[key]._local_tensor.shape[0] for r in ranks) == value.shape[0], key
    embed = [r["model.embed_tokens.weight"]._local_tensor.shape[0] for r in ranks]
    assert embed[0] == embed[1] + 1


def test_the_allow_list_alone_loads_every_layout(verl_checkpoints):
    """torch registers the DTensor classes as safe itself when torch.distributed.tensor is imported; with
    that registry emptied, the reader's own allow-list still loads FSDP, HSDP and LoRA rank files."""
    from mathctl.convert.verl import _load_rank, _safe_globals

    _safe_globals()  # imports torch.distributed.tensor (and so fills torch's registry) before it is emptied
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        for name in ("full/model_world_size_2_rank_1.pt", "hsdp/model_world_size_4_rank_3.pt",
                     "lora/model_world_size_2_rank_0.pt"):
            assert _load_rank(verl_checkpoints / name)
        with pytest.raises(Exception, match="DTensor"):  # and without it they do not load
            torch.load(verl_checkpoints / "full/model_world_size_2_rank_1.pt", weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def test_verl_lora_is_merged_as_peft_merges(verl_checkpoints, tmp_path):
    summary = convert(verl_checkpoints / "lora", tmp_path / "hf", fmt_from="verl", progress_bar=False)
    assert len(summary["lora_merged"]) == 2 * 3  # 2 layers x (q_proj, v_proj, down_proj)
    assert any("LoRA r=4 alpha=8 scale=2" in note for note in summary["notes"])
    got = _loaded_state(tmp_path / "hf")
    want = torch.load(verl_checkpoints / "lora_expected.pt", weights_only=True)
    base = torch.load(verl_checkpoints / "full_expected.pt", weights_only=True)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(want[key], base[key])  # the adapter changed the weights ...
    _assert_bit_exact(got, want)  # ... exactly as peft's merge_and_unload does


def _in_process(capsys, *argv: str) -> tuple[int, str]:
    from mathctl.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def _one_error(code: int, err: str, message: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert any(line.startswith("hint:") for line in err.splitlines()), err


def test_bad_verl_folders_exit_2(verl_checkpoints, tmp_path, capsys):
    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(verl_checkpoints / "full", folder)
        return folder

    missing = copy("missing")
    (missing / "model_world_size_2_rank_1.pt").unlink()
    mismatched = copy("mismatched")
    (mismatched / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    mixed = copy("mixed")
    shutil.copy(mixed / "model_world_size_2_rank_0.pt", mixed / "model_world_size_4_rank_0.pt")
    foreign = copy("foreign")  # rank 1 from the LoRA run: other names
    shutil.copy(verl_checkpoints / "lora" / "model_world_size_2_rank_1.pt", foreign / "model_world_size_2_rank_1.pt")
    no_alpha = tmp_path / "no-alpha"
    shutil.copytree(verl_checkpoints / "lora", no_alpha)
    shutil.rmtree(no_alpha / "lora_adapter")
    cases = [(missing, "is missing 1 of its 2 ranks (model_world_size_2_rank_1.pt)"),
             (mismatched, "says world_size 4, but the model files are for world size 2"),
             (mixed, "mixes model files of several world sizes"),
             (foreign, "model_world_size_2_rank_1.pt lacks"),
             (no_alpha, "no lora_adapter/adapter_config.json"),
             (tmp_path / "empty", "holds no model_world_size_W_rank_R.pt files")]
    (tmp_path / "empty").mkdir()
    for folder, message in cases:
        _one_error(*_in_process(capsys, "convert-ckpt", str(folder), str(tmp_path / "out"), "--from", "verl"), message)
    assert not (tmp_path / "out").exists()


def test_pickled_code_in_a_rank_file_is_refused(tmp_path):
    """weights_only: a rank file naming any class outside the DTensor allow-list does not load."""
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "obj": Path("x")}, folder / "model_world_size_1_rank_0.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert(folder, tmp_path / "out", fmt_from="verl", progress_bar=False)


# --- Instella / OLMo --------------------------------------------------------------------------

D, HEADS, KV_HEADS, LAYERS, INTER, VOCAB = 16, 4, 2, 2, 24, 40
HEAD_DIM = D // HEADS


def _hf_names(tied: bool) -> dict[str, tuple[int, ...]]:
    """InstellaForCausalLM's parameters (hf_instella/modeling_instella.py) at tiny sizes."""
    names = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        names.update({
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, D), p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, D),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, D), p + "self_attn.o_proj.weight": (D, D),
            p + "self_attn.q_norm.weight": (HEADS * HEAD_DIM,), p + "self_attn.k_norm.weight": (KV_HEADS * HEAD_DIM,),
            p + "mlp.gate_proj.weight": (INTER, D), p + "mlp.up_proj.weight": (INTER, D), p + "mlp.down_proj.weight": (D, INTER),
            p + "pre_attention_layernorm.weight": (D,), p + "pre_feedforward_layernorm.weight": (D,),
        })
    if not tied:
        names["lm_head.weight"] = (VOCAB, D)
    return names


def _fake_instella_hf(folder: Path, tied: bool, dtype=torch.float32) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    state = {name: torch.randn(shape).to(dtype) for name, shape in _hf_names(tied).items()}
    save_file(state, folder / "model.safetensors")
    config = {"architectures": ["InstellaForCausalLM"], "model_type": "instella",
              "auto_map": {"AutoConfig": "configuration_instella.InstellaConfig",
                           "AutoModelForCausalLM": "modeling_instella.InstellaForCausalLM"},
              "hidden_size": D, "intermediate_size": INTER, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": tied, "pad_token_id": 1, "eos_token_id": 0, "bos_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_instella.py", "modeling_instella.py"):
        (folder / name).write_text("# the model's own code\n")
    return state


@pytest.mark.parametrize("tied", [False, True])
def test_instella_hf_to_olmo_and_back_is_bit_exact(tmp_path, tied):
    state = _fake_instella_hf(tmp_path / "hf", tied)
    summary = convert(tmp_path / "hf", tmp_path / "olmo", fmt_to="olmo", progress_bar=False)
    assert summary["to"] == "olmo" and summary["verified"]
    olmo = torch.load(tmp_path / "olmo" / "model.pt", weights_only=True)
    assert len(olmo) == 2 + 8 * LAYERS + (0 if tied else 1)
    # the fused layout, checked independently of the converter's table
    q, k, v = (state[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(olmo["transformer.blocks.1.att_proj.weight"], torch.cat([q, k, v]))
    up, gate = state["model.layers.1.mlp.up_proj.weight"], state["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(olmo["transformer.blocks.1.ff_proj.weight"], torch.cat([up, gate]))
    assert torch.equal(olmo["transformer.blocks.0.ff_out.weight"], state["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(olmo["transformer.wte.weight"], state["model.embed_tokens.weight"])
    assert ("transformer.ff_out.weight" in olmo) == (not tied)
    import yaml

    model = yaml.safe_load((tmp_path / "olmo" / "config.yaml").read_text())["model"]
    assert (model["d_model"], model["n_heads"], model["n_kv_heads"], model["mlp_hidden_size"]) == (D, HEADS, KV_HEADS, 2 * INTER)
    assert model["weight_tying"] is tied
    back = convert(tmp_path / "olmo", tmp_path / "back", progress_bar=False)  # detected: model.pt + config.yaml
    assert back["from"] == "olmo"
    got = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (tmp_path / "back" / "modeling_instella.py").is_file()  # its remote code travels with it


def _olmo_checkpoint(folder: Path, tied: bool, grouped: bool = False) -> dict[str, torch.Tensor]:
    """An unsharded Instella checkpoint folder as its trainer writes it: model.pt + config.yaml."""
    import yaml

    folder.mkdir(parents=True)
    torch.manual_seed(2)
    kv = KV_HEADS * HEAD_DIM
    state = {"transformer.wte.weight": torch.randn(VOCAB, D), "transformer.ln_f.weight": torch.randn(D)}
    for i in range(LAYERS):
        p = f"transformer.block_groups.{i // 2}.{i % 2}." if grouped else f"transformer.blocks.{i}."
        state.update({p + "att_proj.weight": torch.randn(D + 2 * kv, D), p + "attn_out.weight": torch.randn(D, D),
                      p + "q_norm.weight": torch.randn(D), p + "k_norm.weight": torch.randn(kv),
                      p + "ff_proj.weight": torch.randn(2 * INTER, D), p + "ff_out.weight": torch.randn(D, INTER),
                      p + "attn_norm.weight": torch.randn(D), p + "ff_norm.weight": torch.randn(D)})
    if not tied:
        state["transformer.ff_out.weight"] = torch.randn(VOCAB, D)
    torch.save(state, folder / "model.pt")
    config = {"run_name": "tiny", "model": {
        "d_model": D, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS, "mlp_hidden_size": 2 * INTER,
        "weight_tying": tied, "alibi": False, "rope": True, "attention_layer_norm": True, "include_bias": False,
        "block_type": "sequential", "layer_norm_type": "rms", "activation_type": "swiglu",
        "max_sequence_length": 64, "vocab_size": VOCAB - 3, "embedding_size": VOCAB, "eos_token_id": 0,
        "pad_token_id": 1, "block_group_size": 2 if grouped else 1}, "save_folder": "${run_name}"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return state


@pytest.mark.parametrize("tied", [False, True])
def test_olmo_to_instella_hf_and_back_is_bit_exact(tmp_path, tied):
    state = _olmo_checkpoint(tmp_path / "ckpt", tied)
    summary = convert(tmp_path / "ckpt", tmp_path / "hf", fmt_from="instella", progress_bar=False)
    assert summary["verified"]
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in hf.items()} == _hf_names(tied)
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"],
                       state["transformer.blocks.1.att_proj.weight"][D:D + KV_HEADS * HEAD_DIM])
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], state["transformer.blocks.0.ff_proj.weight"][INTER:])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "instella" and config["architectures"] == ["InstellaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"], config["vocab_size"],
            config["tie_word_embeddings"]) == (D, INTER, KV_HEADS, VOCAB, tied)
    convert(tmp_path / "hf", tmp_path / "olmo.pt", fmt_to="instella", progress_bar=False)  # a bare .pt output
    back = torch.load(tmp_path / "olmo.pt", weights_only=True)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_olmo_block_groups_and_dry_run(tmp_path):
    grouped = _olmo_checkpoint(tmp_path / "grouped", tied=False, grouped=True)
    plain = _olmo_checkpoint(tmp_path / "plain", tied=False)
    assert all(torch.equal(a, b) for a, b in zip(grouped.values(), plain.values()))  # same seed, same values
    summary = convert(tmp_path / "grouped", None, fmt_from="olmo", dry_run=True, progress_bar=False)
    rows = {(r["source"], r["target"]) for r in summary["mapping"]}
    assert ("transformer.block_groups.0.1.att_proj.weight", "model.layers.1.self_attn.v_proj.weight") in rows
    convert(tmp_path / "grouped", tmp_path / "a", progress_bar=False)
    convert(tmp_path / "plain", tmp_path / "b", progress_bar=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_instella_input_exits_2(tmp_path, capsys):
    state = _olmo_checkpoint(tmp_path / "lacking", tied=False)
    del state["transformer.blocks.1.q_norm.weight"]
    torch.save(state, tmp_path / "lacking" / "model.pt")
    _olmo_checkpoint(tmp_path / "noconfig", tied=False)
    (tmp_path / "noconfig" / "config.yaml").unlink()
    _olmo_checkpoint(tmp_path / "biased", tied=False)
    text = (tmp_path / "biased" / "config.yaml").read_text().replace("include_bias: false", "include_bias: true")
    (tmp_path / "biased" / "config.yaml").write_text(text)
    _olmo_checkpoint(tmp_path / "small", tied=False)
    text = (tmp_path / "small" / "config.yaml").read_text().replace("mlp_hidden_size: 48", "mlp_hidden_size: 40")
    (tmp_path / "small" / "config.yaml").write_text(text)
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, qwen / "model.safetensors")
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    cases = [(["lacking", "--from", "olmo"], "lacks 1 Instella tensors: transformer.blocks.1.q_norm.weight"),
             (["noconfig", "--from", "olmo"], "has no config.yaml"),
             (["biased", "--from", "olmo"], "model.include_bias is True"),
             (["small", "--from", "olmo"], "do not have the shapes the config gives"),
             (["qwen", "--to", "olmo"], "--to olmo needs an Instella model")]
    for (name, *flags), message in cases:
        code, err = _in_process(capsys, "convert-ckpt", str(tmp_path / name), str(tmp_path / "out"), *flags)
        _one_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_instella_hf_folder_reads_without_remote_code(tmp_path):
    """`--from hf` of an Instella folder (reshard, cast) needs no Instella class: names and shapes come from
    config.json, and a wrong shape is still caught."""
    state = _fake_instella_hf(tmp_path / "hf", tied=False)
    convert(tmp_path / "hf", tmp_path / "bf16", dtype="bf16", progress_bar=False)
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in state.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    state["model.norm.weight"] = torch.zeros(D + 1)
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        convert(tmp_path / "hf", tmp_path / "x", progress_bar=False)
    with pytest.raises(ConfigError, match="allow-missing"):
        convert(tmp_path / "hf", tmp_path / "y", fmt_to="olmo", allow_missing=True, progress_bar=False)
