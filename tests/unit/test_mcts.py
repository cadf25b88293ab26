"""MCTS core against hand-worked trees: selection, expansion, values, back-propagation, beam search,
and the SFT-trace and PPM-pair extraction (mathctl/mcts.py)."""

from __future__ import annotations

import math

import pytest

from mathctl.engines import Sample
from mathctl.mcts import (
    Callbacks,
    Node,
    PairsConfig,
    SearchConfig,
    Searcher,
    StepFormat,
    Tree,
    backpropagate,
    block_code,
    chosen_answer,
    edit_distance,
    leaf_counts,
    ppm_pairs,
    select_child,
    sft_traces,
    tree_from_record,
    tree_record,
)

TEXT = StepFormat(kind="text", text_delimiter="\n")


def node(tag: str, parent: Node | None = None, *, visits: int = 0, value_sum: float = 0.0, text: str = "",
         **flags) -> Node:
    n = Node(tag=tag, text=text or f"step {tag}\n", depth=(parent.depth + 1) if parent else 0, parent=parent,
             visits=visits, value_sum=value_sum, **flags)
    if parent is not None:
        parent.children.append(n)
    return n


# --- back-propagation and selection -------------------------------------------------------------


def test_backpropagate_adds_a_visit_and_the_value_up_to_the_root():
    root = node("0")
    a = node("0.1", root)
    b = node("0.1.1", a)
    backpropagate(b, 1.0)
    backpropagate(b, -1.0)
    assert [(n.visits, n.value_sum) for n in (root, a, b)] == [(2, 0.0), (2, 0.0), (2, 0.0)]
    assert b.value == 1.0  # the first value it was updated with
    sibling = node("0.2", root)
    backpropagate(sibling, -1.0)
    assert root.visits == 3 and root.q == pytest.approx(-1 / 3)
    assert a.visits == 2  # a sibling's value does not reach a


def test_uct_exploits_then_explores_as_computed_by_hand():
    cfg = SearchConfig(c_puct=2.0)
    root = node("0", visits=10)
    good = node("0.1", root, visits=4, value_sum=2.0)    # 0.5 + 2*sqrt(ln 10 / 4) = 2.0175
    bad = node("0.2", root, visits=6, value_sum=-3.0)    # -0.5 + 2*sqrt(ln 10 / 6) = 0.7390
    assert select_child(root, cfg) is good
    good.visits, good.value_sum = 9, 1.8                 # 0.2 + 2*sqrt(ln 10 / 9) = 1.2116
    bad.visits, bad.value_sum = 1, -0.5                  # -0.5 + 2*sqrt(ln 10 / 1) = 2.5349
    assert select_child(root, cfg) is bad


def test_unvisited_children_score_their_q_and_ties_go_to_the_first():
    cfg = SearchConfig()
    root = node("0", visits=1)
    wrong = node("0.1", root, visits=1, value_sum=-1.0)  # -1 + 2*sqrt(ln 1 / 1) = -1
    fresh1 = node("0.2", root)
    node("0.3", root)
    assert select_child(root, cfg) is fresh1             # 0 > -1; 0.2 and 0.3 tie, the first wins
    wrong.value_sum = 1.0
    assert select_child(root, cfg) is wrong              # 1 > 0
    prior = node("0.4", root)
    prior.update(1.5)                                    # a PPM prior: one visit, Q = 1.5
    assert select_child(root, cfg) is prior
    assert select_child(root, SearchConfig(unvisited="first")) is fresh1


def test_puct_formula():
    cfg = SearchConfig(selection="puct", c_puct=1.0)
    root = node("0", visits=16)
    a = node("0.1", root, visits=3, value_sum=1.5)  # 0.5 + 0.5 * 4 / 4 = 1.0
    b = node("0.2", root, visits=0)                 # 0 + 0.5 * 4 / 1 = 2.0
    assert select_child(root, cfg) is b
    b.visits, b.value_sum = 7, -3.5                 # -0.5 + 0.5 * 4 / 8 = -0.25
    assert select_child(root, cfg) is a


def test_selection_skips_terminal_and_exhausted_children_and_marks_dead_ends():
    cfg = SearchConfig()
    root = node("0", visits=3)
    done = node("0.1", root, visits=1, value_sum=1.0, terminal=True, reason="answer")
    mid = node("0.2", root, visits=2, value_sum=-2.0)
    leaf = node("0.2.1", mid, visits=2, value_sum=-2.0, terminal=True, reason="answer")
    assert select_child(root, cfg) is mid
    assert select_child(mid, cfg) is None and mid.exhausted  # all its children are terminal
    assert select_child(root, cfg) is None and root.exhausted
    assert select_child(node("0", None), cfg) is not None     # an unexpanded node selects itself
    assert done.terminal and leaf.terminal


# --- a whole search, scripted ---------------------------------------------------------------------


def scripted(script: dict[str, list[tuple[str, str | int | None]]], calls: list[list[str]]):
    """An engine stand-in: continuations by path text; a str stop reason is a stop string, an int EOS."""

    def generate(prompts, seeds, sampling):
        calls.append(list(prompts))
        out = []
        for prompt in prompts:
            path = prompt.split("Q:", 1)[1]
            out.append([Sample(text=text, token_ids=[], finish_reason="stop", stop_reason=why)
                        for text, why in script[path]][: sampling.n])
        return out

    return generate


def grade(answers, golds):
    return [a == g for a, g in zip(answers, golds)]


def test_terminal_guided_mcts_on_a_two_branch_tree():
    """Iteration 1 expands the root (A, B), selects A (tie -> first), expands it, finds the right answer
    (+1 up to the root). Iteration 2 takes B (A is exhausted) and finds a wrong one (-1). Iteration 3
    finds nothing left."""
    calls: list[list[str]] = []
    script = {"": [("A\n", "\n"), ("B\n", "\n"), ("A\n", "\n")],
              "A\n": [("so \\boxed{2}", 7)], "B\n": [("so \\boxed{3}", 7)]}
    cfg = SearchConfig(iterations=3, n_generate_sample=3, max_depth=4)
    searcher = Searcher(cfg, TEXT, Callbacks(generate=scripted(script, calls), grade=grade))
    tree = Tree(id="p", question="1+1", gold="2", prompt="Q:")
    searcher.run([tree])
    a, b = tree.root.children
    assert [c.text for c in tree.root.children] == ["A\n", "B\n"]  # the duplicate A was dropped
    assert (a.visits, a.q, b.visits, b.q) == (1, 1.0, 1, -1.0)
    assert (tree.root.visits, tree.root.value_sum) == (2, 0.0)
    assert a.children[0].answer == "2" and a.children[0].correct is True
    assert b.children[0].correct is False
    assert searcher.stats.engine_calls == 3 and tree.root.exhausted
    assert chosen_answer(tree, "mcts") is a.children[0]
    traces = sft_traces(tree)
    assert [t["response"] for t in traces] == ["A\nso \\boxed{2}"]
    pairs = ppm_pairs(tree, PairsConfig(min_edit_distance=0))
    assert [(p["pos"], p["neg"], p["pos_count"], p["neg_count"], p["margin"]) for p in pairs] == [("A\n", "B\n", 1, 1, 2.0)]
    assert ppm_pairs(tree, PairsConfig()) == []  # rStar's 20-character edit distance filters A/B


def test_batched_search_makes_one_engine_call_per_level_for_all_trees():
    calls: list[list[str]] = []
    script = {"": [("A\n", "\n"), ("B\n", "\n")], "A\n": [("\\boxed{2}", 7)], "B\n": [("\\boxed{2}", 7)]}
    cfg = SearchConfig(iterations=2, n_generate_sample=2, max_depth=4)
    trees = [Tree(id=f"p{i}", question="q", gold="2", prompt="Q:") for i in range(5)]
    searcher = Searcher(cfg, TEXT, Callbacks(generate=scripted(script, calls), grade=grade))
    searcher.run(trees)
    assert searcher.stats.engine_calls == 3 == len(calls)  # root level, A level, B level: 5 trees each
    assert all(len(c) == 5 for c in calls)
    alone = Searcher(cfg, TEXT, Callbacks(generate=scripted(script, []), grade=grade))
    for i in range(5):
        alone.run([Tree(id=f"p{i}", question="q", gold="2", prompt="Q:")])
    assert alone.stats.engine_calls == 15
    assert [tree_record(t, "mcts")["nodes"] for t in trees][0] is not None


def test_expansion_marks_terminals_and_keeps_only_the_first_answer():
    calls: list[list[str]] = []
    script = {"": [("x\n", "\n"), ("no answer", 7), ("\\boxed{5}", 7), ("\\boxed{6}", 7), ("cut off", None)]}
    tree = Tree(id="p", question="q", gold="5", prompt="Q:")
    cfg = SearchConfig(n_generate_sample=5)
    new = Searcher(cfg, TEXT, Callbacks(generate=scripted(script, calls), grade=grade)).expand(
        [(tree, tree.root)], n=5, temperature=1.0)
    assert [(c.text, c.reason) for c in new] == [("\\boxed{5}", "answer")]  # rStar: the first answer only
    tree = Tree(id="p", question="q", gold="5", prompt="Q:")
    cfg = SearchConfig(n_generate_sample=5, first_answer_only=False, max_depth=1)
    script[""][4] = ("cut off", None)
    searcher = Searcher(cfg, TEXT, Callbacks(generate=scripted(script, calls), grade=grade))
    new = searcher.expand([(tree, tree.root)], n=5, temperature=1.0)
    assert [c.reason for c in new] == ["too_deep", "no_answer", "answer", "answer", "no_answer"]
    assert [c.correct for c in new] == [None, None, True, False, None]
    searcher.assign_values(new)
    assert [c.q for c in new] == [-1.0, -1.0, 1.0, -1.0, -1.0]
    assert tree.root.visits == 2  # invalid terminals get -1 on that node only; answers back-propagate


def test_ppm_values_are_priors_and_terminal_rewards_in_evaluation():
    raw = {"A\n": 5.0, "B\n": -5.0, "A\n\\boxed{9}": 10.0}

    def score(items):
        return [raw["".join(steps)] for _, steps in items]

    script = {"": [("A\n", "\n"), ("B\n", "\n")], "A\n": [("\\boxed{9}", 7)]}
    cfg = SearchConfig(iterations=1, n_generate_sample=2, terminal_reward="ppm", max_depth=3)
    tree = Tree(id="p", question="q", gold=None, prompt="Q:")
    searcher = Searcher(cfg, TEXT, Callbacks(generate=scripted(script, []), score=score, grade=grade))
    searcher.run([tree])
    a, b = tree.root.children
    assert a.value == pytest.approx(math.tanh(1.0)) and b.q == pytest.approx(math.tanh(-1.0))
    leaf = a.children[0]
    assert leaf.q == pytest.approx(math.tanh(2.0))  # evaluation: the PPM's value of the whole path
    assert a.visits == 2 and a.value_sum == pytest.approx(math.tanh(1.0) + math.tanh(2.0))
    assert searcher.stats.ppm_calls == 2 and searcher.stats.ppm_scored == 3


def test_beam_search_keeps_the_best_children_and_returns_the_best_answer():
    raw = {"A\n": 4.0, "B\n": 1.0, "C\n": -3.0, "A\n\\boxed{1}": -2.0, "A\nD\n": 2.0, "B\n\\boxed{2}": 3.0,
           "B\nE\n": 0.0, "A\nD\n\\boxed{3}": 1.0}
    script = {"": [("A\n", "\n"), ("B\n", "\n"), ("C\n", "\n")], "A\n": [("\\boxed{1}", 7), ("D\n", "\n")],
              "B\n": [("\\boxed{2}", 7), ("E\n", "\n")], "A\nD\n": [("\\boxed{3}", 7)], "B\nE\n": [("\\boxed{4}", 7)]}

    def score(items):
        return [raw.get("".join(steps), -9.0) for _, steps in items]

    calls: list[list[str]] = []
    cfg = SearchConfig(mode="beam", beam_width=2, n_generate_sample=3, max_depth=4, first_answer_only=False)
    tree = Tree(id="p", question="q", gold="2", prompt="Q:")
    Searcher(cfg, TEXT, Callbacks(generate=scripted(script, calls), score=score, grade=grade)).run([tree])
    # depth 1 keeps A and B (C is third); depth 2: answers \boxed{1} and \boxed{2} go to the pool, each
    # shrinking the beam, so no live child is kept
    assert [c[0][2:] for c in calls] == ["", "A\n"] and len(calls[1]) == 2
    assert sorted(n.answer for n in tree.answers) == ["1", "2"]
    best = chosen_answer(tree, "beam")
    assert best.answer == "2" and best.correct is True


# --- code steps ------------------------------------------------------------------------------------


def test_block_code_collects_the_open_block():
    fmt = StepFormat()
    path = "<code>\nx = 2<end_of_step>"
    assert block_code(path, "\ny = x * 3<end_of_step>", fmt) == "\nx = 2\n\ny = x * 3\n"
    closed = path + "\nprint(x)<end_of_code>\n<output>2<end_of_output>"
    assert block_code(closed, "\n<answer>\\boxed{2}<end_of_answer>", fmt) is None
    assert block_code(closed, "\n<code>\nz = 1<end_of_step>", fmt) == "\nz = 1\n"
    assert block_code("", "just words<end_of_step>", fmt) is None


class Result:
    def __init__(self, output: str, error: str | None = None):
        self.output, self.error = output, error

    def observation(self) -> str:
        return self.output if self.error is None else f"{self.error}: boom"


def test_code_steps_run_their_block_append_the_output_and_count_errors():
    fmt = StepFormat()
    ran: list[str] = []

    def execute(programs):
        ran.extend(programs)
        return [Result("", "NameError") if "oops" in p else Result("6") for p in programs]

    script = {"": [("<code>\nx = 2<end_of_step>", "<end_of_step>"), ("<code>\noops<end_of_step>", "<end_of_step>")],
              "<code>\noops<end_of_step>": [("\noops again<end_of_code>", "<end_of_code>")],
              "<code>\nx = 2<end_of_step>": [("\nprint(x * 3)<end_of_code>", "<end_of_code>")]}
    tree = Tree(id="p", question="q", gold="6", prompt="Q:")
    cfg = SearchConfig(n_generate_sample=2, errors_threshold=2)
    searcher = Searcher(cfg, fmt, Callbacks(generate=scripted(script, []), execute=execute, grade=grade))
    good, bad = searcher.expand([(tree, tree.root)], n=2, temperature=1.0)
    assert (good.error, good.errors, bad.error, bad.errors, bad.terminal) == (None, 0, "NameError", 1, False)
    (closed,) = searcher.expand([(tree, good)], n=2, temperature=1.0)
    assert closed.text == "\nprint(x * 3)<end_of_code>\n<output>6<end_of_output>"
    assert ran[-1] == "\nx = 2\n\nprint(x * 3)"  # the whole block, re-run from its start
    (dead,) = searcher.expand([(tree, bad)], n=2, temperature=1.0)
    assert (dead.errors, dead.terminal, dead.reason) == (2, True, "too_many_errors")
    assert dead.text.endswith("<output>NameError: boom<end_of_output>")
    assert searcher.stats.executions == 4


# --- extraction -----------------------------------------------------------------------------------


def hand_tree() -> Tree:
    """root -> a (Q .8), b (Q .1), c (Q -.6), d (Q -.9); correct leaves under a and b; wrong ones under
    b, c and d; b has both below, so the search continues into it."""
    tree = Tree(id="t", question="q", gold="1", prompt="")
    r = tree.root
    r.visits = 10
    a = node("0.1", r, visits=5, value_sum=4.0, text="a" * 30)
    node("0.1.1", a, visits=4, value_sum=4.0, terminal=True, reason="answer", answer="1", correct=True)
    b = node("0.2", r, visits=10, value_sum=1.0, text="b" * 30)
    b1 = node("0.2.1", b, visits=3, value_sum=3.0, terminal=True, reason="answer", answer="1", correct=True,
              text="good " * 6)
    b2 = node("0.2.2", b, visits=4, value_sum=-4.0, terminal=True, reason="answer", answer="7", correct=False,
              text="bad " * 8)
    c = node("0.3", r, visits=5, value_sum=-3.0, text="c" * 30)
    node("0.3.1", c, visits=1, value_sum=-1.0, terminal=True, reason="too_deep")
    d = node("0.4", r, visits=10, value_sum=-9.0, text="d" * 30)
    node("0.4.1", d, visits=1, value_sum=-1.0, terminal=True, reason="answer", answer="3", correct=False)
    e = node("0.5", r, visits=1, value_sum=-1.0, terminal=True, reason="too_many_errors", errors=2, error="NameError",
             text="e" * 30)
    assert b1.correct and not b2.correct and e.terminal
    return tree


def test_leaf_counts():
    tree = hand_tree()
    counts = leaf_counts(tree.root)
    a, b, c, d, e = tree.root.children
    assert counts[id(tree.root)] == (2, 3)
    assert [counts[id(n)] for n in (a, b, c, d, e)] == [(1, 0), (1, 1), (0, 1), (0, 1), (0, 0)]


def test_ppm_pairs_follow_rstar_construction():
    tree = hand_tree()
    pairs = ppm_pairs(tree, PairsConfig())
    got = [(p["node"], p["pos"][0], p["neg"][0], p["pos_count"], p["neg_count"]) for p in pairs]
    # root: positives a (.8), b (.1) by Q descending; negatives d (-.9), c (-.6) by Q ascending
    assert got[:4] == [("0", "a", "d", 2, 2), ("0", "a", "c", 2, 2), ("0", "b", "d", 2, 2), ("0", "b", "c", 2, 2)]
    # then into b (both kinds below): b1 against b2, one on each side -> up to 4 from the other side
    assert got[4:] == [("0.2", "g", "b", 1, 1)]
    assert pairs[4]["prefix"] == ["b" * 30] and pairs[0]["prefix"] == []
    assert pairs[0]["margin"] == pytest.approx(0.8 + 0.9)
    strict = ppm_pairs(tree, PairsConfig(min_margin=1.0))
    assert [(p["pos"][0], p["neg"][0]) for p in strict] == [("a", "d"), ("a", "c"), ("b", "d"), ("g", "b")]
    assert ppm_pairs(tree, PairsConfig(min_edit_distance=31)) == []


def test_sft_traces_rank_correct_paths_by_mean_then_min_q_and_skip_errors():
    tree = hand_tree()
    traces = sft_traces(tree, top_n=2)
    assert [t["leaf"] for t in traces] == ["0.1.1", "0.2.1"]  # means .9 and .55
    assert traces[0]["response"] == "a" * 30 + "step 0.1.1\n" and traces[0]["mean_q"] == pytest.approx(0.9)
    tree.root.children[0].error = "ZeroDivisionError"         # an execution error on a's path
    assert [t["leaf"] for t in sft_traces(tree, top_n=2)] == ["0.2.1"]


def test_tree_record_round_trip():
    tree = hand_tree()
    record = tree_record(tree, "mcts")
    assert record["solved"] and record["answer"] == "1" and record["correct"] and record["num_nodes"] == 10
    again = tree_from_record(record)
    assert tree_record(again, "mcts") == record
    assert ppm_pairs(again, PairsConfig()) == ppm_pairs(tree, PairsConfig())


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("same", "same") == 0
    assert edit_distance("a" * 50, "b" * 50, cap=5) > 5


def test_sft_traces_can_require_the_answer_to_match_the_code_output():
    tree = Tree(id="t", question="q", gold="5", prompt="")
    lucky = node("0.1", tree.root, visits=1, value_sum=1.0, text="<code>\nprint(4)<end_of_code>\n<output>4<end_of_output>")
    node("0.1.1", lucky, visits=1, value_sum=1.0, terminal=True, reason="answer", answer="5", correct=True,
         text="\n<answer>\\boxed{5}<end_of_answer>")
    sound = node("0.2", tree.root, visits=1, value_sum=1.0, text="<code>\nprint(5.0)<end_of_code>\n<output>5.0<end_of_output>")
    node("0.2.1", sound, visits=1, value_sum=1.0, terminal=True, reason="answer", answer="5", correct=True,
         text="\n<answer>\\boxed{5}<end_of_answer>")
    assert [t["leaf"] for t in sft_traces(tree)] == ["0.1.1", "0.2.1"]  # rStar keeps both
    assert [t["leaf"] for t in sft_traces(tree, require_output_match=True)] == ["0.2.1"]
