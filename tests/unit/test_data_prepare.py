"""`mathctl data prepare`: every source from a fixture in its real schema, masks token by token,
packing, RL rows, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathctl.core.errors import ConfigError, DataError
from mathctl.data import IGNORE, PrepareConfig, english_share, gsm8k_solution, pack, prepare

TRAIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "train"

# One or two rows per source, in the field layout of the hub dataset.
FIXTURES = {
    "openmath2": [{"problem": "What is $2+3$?", "generated_solution": "We add: $2+3=5$. The answer is $\\boxed{5}$.",
                   "expected_answer": "5", "problem_source": "augmented_math"}],
    "am-r1-distilled": [
        {"messages": [{"role": "user", "content": "Compute 7*6.", "info": {"source": "natural_reasoning",
                                                                             "reference_answer": "42"}},
                      {"role": "assistant", "content": "<think>7*6=42</think>\n<answer>The product is \\boxed{42}.</answer>",
                       "info": {"source": "am-0309"}}]},
        {"messages": [{"role": "user", "content": "计算 7 乘以 6。", "info": {"source": "x", "reference_answer": "42"}},
                      {"role": "assistant", "content": "<think>七乘六</think><answer>42</answer>", "info": {}}]},
    ],
    "gsm8k": [{"question": "Tom has 3 boxes of 4 pens. How many pens?",
               "answer": "He has 3*4 = <<3*4=12>>12 pens.\n#### 12"}],
    "math": [{"problem": "Find $x$ if $x+1=3$.", "solution": "Subtract: $x=\\boxed{2}$.", "level": "Level 2",
              "type": "Algebra"}],
    "big-math": [{"problem": "Find 2^5.", "answer": "32", "source": "cn_k12", "domain": ["Algebra"],
                  "llama8b_solve_rate": 0.8}],
    "deepmath": [{"question": "Evaluate the limit of 1/n.", "final_answer": "0", "difficulty": 3.5,
                  "topic": "Mathematics -> Calculus", "r1_solution_1": "It tends to \\boxed{0}.",
                  "r1_solution_2": "x", "r1_solution_3": "y"}],
    "deepscaler": [{"problem": "What is 1+1?", "answer": "2", "solution": "Clearly \\boxed{2}."}],
    "rstar": [{"question": "What is 5-2?", "response": "<code>\nprint(5-2)\n<end_of_step>\n<end_of_code>\n"
               "<output>3<end_of_output>\n<answer>The answer is \\boxed{3}<end_of_answer>"}],
    "jsonl": [{"q": "What is 9-4?", "a": "5", "sol": "9-4 = \\boxed{5}"}],
}
EXPECT = {  # source -> (problem, answer, source field, difficulty) of the first kept row
    "openmath2": ("What is $2+3$?", "5", "openmath2/augmented_math", None),
    "am-r1-distilled": ("Compute 7*6.", "42", "am-r1-distilled/natural_reasoning", None),
    "gsm8k": ("Tom has 3 boxes of 4 pens. How many pens?", "12", "gsm8k", None),
    "math": ("Find $x$ if $x+1=3$.", "2", "math/Algebra", 2.0),
    "big-math": ("Find 2^5.", "32", "big-math/cn_k12", 0.8),
    "deepmath": ("Evaluate the limit of 1/n.", "0", "deepmath/Mathematics -> Calculus", 3.5),
    "deepscaler": ("What is 1+1?", "2", "deepscaler", None),
    "rstar": ("What is 5-2?", "3", "rstar", None),
    "jsonl": ("What is 9-4?", "5", "jsonl", None),
}


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tmp_path, source, **kw) -> PrepareConfig:
    base = {"source": source, "out": str(tmp_path / "out"), "tokenizer": "tiny:qwen2-tiny", "chat_template": "chatml"}
    if source != "synthetic":
        base["input"] = str(_write(tmp_path, FIXTURES[source]))
    if source == "jsonl":
        base["fields"] = {"problem": "q", "answer": "a", "solution": "sol"}
    base.update(kw)
    return PrepareConfig.model_validate(base)


def _load(folder: Path):
    import datasets

    return datasets.load_from_disk(str(folder))


@pytest.mark.parametrize("source", sorted(FIXTURES))
def test_each_source_sft_and_rl(tmp_path, source, tokenizer):
    problem, answer, origin, difficulty = EXPECT[source]
    if source != "big-math":
        stats = prepare(_cfg(tmp_path, source))
        ds = _load(tmp_path / "out")
        row = ds[0]
        assert (row["problem"], row["answer"], row["source"], row["difficulty"]) == (problem, answer, origin, difficulty)
        assert stats["rows_out"] == len(ds) == 1 and stats["tokens"] == len(row["input_ids"])
        text = tokenizer.decode(row["input_ids"])
        assert problem in text and "<|im_start|>assistant\n" in text
        assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_in"] == len(FIXTURES[source])
    else:
        with pytest.raises(Exception, match="kind=sft is impossible"):
            _cfg(tmp_path, source)
    rl = tmp_path / "rl"
    stats = prepare(_cfg(tmp_path, source, kind="rl", out=str(rl)))
    row = _load(rl)[0]
    assert stats["rows_out"] == 1
    assert row["prompt"].startswith(problem) and row["prompt"].endswith("within \\boxed{}.")
    assert (row["answer"], row["source"]) == (answer, origin)


def test_english_filter_of_am_rows(tmp_path):
    stats = prepare(_cfg(tmp_path, "am-r1-distilled"))
    assert stats["rows_in"] == 2 and stats["rows_out"] == 1 and stats["dropped"] == {"filtered": 1}
    assert english_share("The angle $\\alpha$ is 30 degrees.") == 1.0
    assert english_share("计算 7 乘以 6") == 0.0
    assert english_share("12 + 3 = 15") == 1.0


def test_loss_mask_token_by_token(tmp_path, tokenizer):
    prepare(_cfg(tmp_path, "gsm8k"))
    row = _load(tmp_path / "out")[0]
    ids, labels = row["input_ids"], row["labels"]
    text = tokenizer.decode(ids)
    start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    # the labels are exactly the tokens after the assistant header: prompt tokens carry no loss
    prefix = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
    assert all(label == IGNORE for label in labels[: len(prefix)])
    assert labels[len(prefix):] == ids[len(prefix):]
    assert tokenizer.decode(ids[len(prefix):]).startswith("He has 3*4 = 12 pens.")
    assert tokenizer.decode(ids[len(prefix):]).rstrip().endswith("\\boxed{12}.<|im_end|>")
    prepare(_cfg(tmp_path, "gsm8k", loss_on="all", out=str(tmp_path / "all")))
    assert _load(tmp_path / "all")[0]["labels"] == ids


def test_gsm8k_solution_rewrite():
    sol, final = gsm8k_solution("Half is 48/2 = <<48/2=24>>24.\nTotal 1,000 + 24 = <<1000+24=1024>>1,024\n#### 1,024")
    assert final == "1024" and "<<" not in sol and sol.endswith("The final answer is \\boxed{1024}.")


@pytest.mark.parametrize("pack_batch, max_seq_len", [(4096, 4096), (7, 4096), (5, 121)])
def test_packing_keeps_every_token_once(tmp_path, monkeypatch, pack_batch, max_seq_len):
    # small pack batches: bins are regrouped across many map batches; max_seq_len 121 drops some
    # rows first, so packing reads through the filtered dataset's index mapping
    monkeypatch.setattr("mathctl.data.PACK_BATCH", pack_batch)
    src = _cfg(tmp_path, "synthetic", synthetic_rows=200, out=str(tmp_path / "flat"), max_seq_len=max_seq_len)
    stats = prepare(src)
    flat = _load(tmp_path / "flat")
    if max_seq_len < 4096:
        assert 0 < stats["dropped"]["too_long"] < 200
    stats = prepare(src.model_copy(update={"out": str(tmp_path / "packed"), "pack": True, "seq_len": 512}))
    packed = _load(tmp_path / "packed")
    assert stats["packed_rows"] == len(packed) < len(flat) and stats["fill"] > 0.9
    samples = []
    for row in packed:
        assert len(row["input_ids"]) == sum(row["seq_lens"]) <= 512 and len(row["labels"]) == len(row["input_ids"])
        start = 0
        for n, problem in zip(row["seq_lens"], row["problems"]):
            samples.append((problem, tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
            start += n
    assert sorted(samples) == sorted((r["problem"], tuple(r["input_ids"]), tuple(r["labels"])) for r in flat)


def test_pack_bins():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    bins = pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 30 tokens in bins of 10: optimal here
    assert pack([12, 3], 10) == [[0], [1]]  # an oversize sample gets its own bin


def test_overflow_drop_or_truncate(tmp_path):
    with pytest.raises(DataError, match="too_long"):  # the only row is too long: nothing left, said so
        prepare(_cfg(tmp_path, "math", max_seq_len=20))
    full = prepare(_cfg(tmp_path, "math", out=str(tmp_path / "full")))["tokens"]
    stats = prepare(_cfg(tmp_path, "math", max_seq_len=full - 3, overflow="truncate", out=str(tmp_path / "t")))
    assert stats["truncated"] == 1 and len(_load(tmp_path / "t")[0]["input_ids"]) == full - 3


@pytest.mark.parametrize("name, path", [("gsm8k", "gsm8k/train.jsonl"), ("math", "math/train.jsonl")])
def test_real_train_files(tmp_path, name, path):
    if not (TRAIN / path).is_file():
        pytest.skip("../shared/data is beside the checkout in CI")
    stats = prepare(PrepareConfig(source=name, input=str(TRAIN / path), kind="rl", out=str(tmp_path / "o")))
    expected = 7473 if name == "gsm8k" else 7500
    # two MATH train solutions box nothing (rows 5341 and 5343: "$\\boxed{}$ primes"): no gold, dropped for RL
    dropped = 0 if name == "gsm8k" else 2
    assert stats["rows_in"] == expected and stats["rows_out"] == expected - dropped
    assert stats["dropped"] == ({"no_answer": 2} if dropped else {})
    rows = _load(tmp_path / "o")
    assert all(a.strip() for a in rows["answer"])
    if name == "gsm8k":
        assert rows[0]["answer"] == "72"
    sft = prepare(PrepareConfig(source=name, input=str(TRAIN / path), out=str(tmp_path / "s"), limit=300,
                                tokenizer="tiny:qwen2-tiny", chat_template="chatml"))
    assert sft["rows_out"] >= 290 and sft["trained_tokens"] < sft["tokens"]


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="unknown data source"):
        PrepareConfig(source="gsm9k", out="x")
    bad = _write(tmp_path, [{"question": "q only"}])
    with pytest.raises(DataError) as err:
        prepare(PrepareConfig(source="gsm8k", input=str(bad), out=str(tmp_path / "o"), kind="rl"))
    assert "field answer missing in the first row" in err.value.message and "gsm8k" in err.value.message
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(DataError, match="line 2"):
        prepare(PrepareConfig(source="gsm8k", input=str(broken), out=str(tmp_path / "o2"), kind="rl"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        prepare(PrepareConfig(source="gsm8k", input=str(bad), out=str(tmp_path / "full"), kind="rl"))
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_streaming_gives_the_same_rows(tmp_path):
    """`streaming` reads the source row by row and tokenizes it in chunks of BATCH rows: the same
    output as the Arrow path, row for row (600 rows: chunks of 256 end mid-file)."""
    rows = [{"question": f"Ann has {i} pens and buys {i % 7} more. How many?",
             "answer": f"{i} + {i % 7} = <<{i}+{i % 7}={i + i % 7}>>{i + i % 7}\n#### {i + i % 7}"} for i in range(600)]
    rows[5]["question"] = " "  # one row without a problem: dropped on both paths
    path = _write(tmp_path, rows)
    base = {"source": "gsm8k", "input": str(path), "tokenizer": "tiny:qwen2-tiny", "chat_template": "chatml"}
    a = prepare(PrepareConfig(**base, out=str(tmp_path / "a")))
    b = prepare(PrepareConfig(**base, out=str(tmp_path / "b"), streaming=True))
    assert a["rows_out"] == b["rows_out"] == 599 and a["tokens"] == b["tokens"]
    assert a["dropped"] == b["dropped"] == {"no_problem": 1}
    assert _load(tmp_path / "a").to_list() == _load(tmp_path / "b").to_list()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no spill or temp folder left
