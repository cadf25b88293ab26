"""rStar-Math search over reasoning steps: trees, MCTS, step-level beam search, greedy, and the
extraction of SFT traces and PPM pairs from finished trees.

This module is the algorithm; `mathctl/mcts_sample.py` is the command around it (problems, engine,
reward model, sandbox, files, rounds). The search talks to the outside through three callbacks,
each called once per expansion level for *all* trees of a batch, so a GPU engine sees large batches:

    generate(prompts, seeds) -> list[list[Sample]]      n continuations per prompt (engine.generate)
    execute(programs) -> list[ExecResult]               run code in the sandbox (sandbox.run_many)
    score(items) -> list[float]                         PPM value of each (question, steps) path
    grade(answers, golds) -> list[bool]                 the math grader against the gold answer

Semantics follow rStar-Math's code (microsoft/rStar, branch rStar-math, paraphrased in
SEEDS-REFERENCE.md section 3) and each choice is a `SearchConfig` option:

- A node is one step: the text the policy generated up to and including a stop marker
  (`<end_of_step>`, `<end_of_code>`, `<end_of_answer>`; a blank line for plain-text steps), plus
  `\\n<output>...<end_of_output>` when the step closed a code block and the block was run.
- `Q = W / N` (0 when unvisited). `update(v)` adds one visit and `v`; `value` keeps the first `v`.
- Selection (one level at a time, from the root at the start of each rollout): among the non-terminal,
  non-exhausted children, the first with the highest `Q + c * sqrt(ln N(parent) / N(child))` (UCT;
  an unvisited child scores its Q, which is 0 or its PPM prior: `unvisited: q`, rStar), or PUCT
  `Q + c * (1/k) * sqrt(N(parent)) / (1 + N(child))`, or unvisited children first (`unvisited: first`).
  A node whose children are all terminal or exhausted is marked exhausted.
- Expansion samples `n_generate_sample` continuations, drops exact duplicates, and (rStar) when one of
  them is an answer keeps only that first answer. Code steps re-run their whole block in the sandbox;
  an execution error (an exception, not the substring "error") adds one to the path's consecutive error
  count, and reaching `errors_threshold` ends the path ("too_many_errors").
- Values: an answer terminal gets +1/-1 from the grader (sampling, `terminal_reward: gold`) or its PPM
  value (evaluation, `terminal_reward: ppm`), back-propagated to the root. Invalid terminals (no answer,
  too deep, too many errors) get -1 on that node only (`invalid_backprop: false`). With a PPM, every new
  non-terminal node gets its PPM value as its first visit (`ppm_prior: true`).
- The PPM value is `tanh(raw / 5)` (`ppm_transform`, `ppm_scale`).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from mathctl.core.config import Strict

VALID = "answer"  # the one terminal reason that carries an answer


# --- config -------------------------------------------------------------------------------------


class StepFormat(Strict):
    """What a step is. `code` is rStar-Math's code-augmented format; `text` cuts at a delimiter."""

    kind: Literal["code", "text"] = Field("code", description="code: rStar markers and executed Python blocks; "
                                          "text: one step per `text_delimiter` (a paragraph by default).")
    step_end: str = Field("<end_of_step>", description="Ends an intermediate step (code format).")
    code_start: str = Field("<code>", description="Opens a Python block.")
    code_end: str = Field("<end_of_code>", description="Ends a block's last step; the block then runs.")
    output_start: str = Field("<output>", description="Opens the interpreter output appended after a block.")
    output_end: str = Field("<end_of_output>", description="Closes the appended output.")
    answer_end: str = Field("<end_of_answer>", description="Ends the answer step.")
    text_delimiter: str = Field("\n\n", description="text format: the string that ends a step.")

    def stops(self) -> list[str]:
        if self.kind == "text":
            return [self.text_delimiter]
        return [self.step_end, self.code_end, self.answer_end]


class SearchConfig(Strict):
    """How the trees grow. Defaults are rStar-Math's code defaults where it has one (rstar_deepthink/config.py)."""

    mode: Literal["mcts", "beam", "greedy"] = Field("mcts", description="mcts; beam (step-level beam search "
                                                    "scored by the PPM); greedy (one temperature-0 path).")
    iterations: int = Field(8, ge=1, description="MCTS rollouts per problem.")
    n_generate_sample: int = Field(4, ge=1, description="Continuations sampled per expanded node.")
    max_depth: int = Field(16, ge=1, description="Steps per path at most; a deeper step ends it (too_deep).")
    c_puct: float = Field(2.0, ge=0, description="Exploration constant c.")
    selection: Literal["uct", "puct"] = Field("uct", description="uct: Q + c*sqrt(ln N(parent)/N(child)) (rStar); "
                                              "puct: Q + c*(1/k)*sqrt(N(parent))/(1+N(child)), uniform prior.")
    unvisited: Literal["q", "first"] = Field("q", description="q: an unvisited child scores its Q (0 or its PPM "
                                             "prior; ties go to the first child, rStar); first: unvisited children first.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of expansions.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_step_tokens: int = Field(2048, ge=1, description="Tokens per step at most (rStar max_tokens).")
    errors_threshold: int = Field(2, ge=1, description="Consecutive code errors that end a path.")
    dedup: bool = Field(True, description="Drop exact-duplicate continuations of a node.")
    first_answer_only: bool = Field(True, description="When a continuation is an answer, keep only the first "
                                    "answer and drop the node's other continuations (rStar).")
    terminal_reward: Literal["gold", "ppm"] = Field("gold", description="gold: +1/-1 from the grader (data "
                                                    "generation, rStar is_sampling); ppm: the PPM's value (evaluation).")
    positive_reward: float = 1.0
    negative_reward: float = -1.0
    invalid_backprop: bool = Field(False, description="Back-propagate the negative reward of invalid terminals "
                                   "(rStar: false, the node alone gets it).")
    ppm_prior: bool = Field(True, description="With a PPM, new non-terminal nodes get its value as first visit "
                            "(rStar update_leaf_value).")
    ppm_transform: Literal["tanh", "sigmoid", "raw"] = Field("tanh", description="PPM value = tanh(raw/scale) (rStar), "
                                                             "2*sigmoid(raw/scale)-1, or raw.")
    ppm_scale: float = Field(5.0, gt=0)
    beam_width: int = Field(4, ge=1, description="beam: live paths kept per depth (rStar step_beam_width).")
    batch_problems: int = Field(64, ge=1, description="Trees grown together; one engine call expands all their "
                                "chosen nodes (rStar batch_size).")


# --- trees ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    tag: str
    text: str = ""
    depth: int = 0
    parent: Node | None = field(default=None, repr=False)
    children: list[Node] = field(default_factory=list, repr=False)
    visits: int = 0
    value_sum: float = 0.0
    value: float | None = None       # the first value the node was updated with
    ppm: float | None = None         # the PPM's (transformed) value of the path ending here
    terminal: bool = False
    reason: str | None = None        # answer | no_answer | too_deep | too_many_errors | code_error
    answer: str | None = None
    correct: bool | None = None
    errors: int = 0                  # consecutive code errors on the path, this step included
    error: str | None = None         # exception class of this step's execution
    exhausted: bool = False          # every child is terminal or exhausted: selection skips it

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def update(self, v: float) -> None:
        if self.value is None:
            self.value = v
        self.visits += 1
        self.value_sum += v

    def path(self) -> list[Node]:
        """Nodes from the root's first child down to this one (the root holds no text)."""
        out, node = [], self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def path_text(self) -> str:
        return "".join(n.text for n in self.path())

    @property
    def valid_answer(self) -> bool:
        return self.terminal and self.reason == VALID


@dataclass(eq=False)
class Tree:
    id: str
    question: str
    gold: Any
    prompt: str                      # what the policy continues: the rendered question, before any step
    root: Node = field(default_factory=lambda: Node(tag="0"))
    cursor: Node | None = None
    answers: list[Node] = field(default_factory=list)  # beam search's answer pool

    def nodes(self) -> list[Node]:
        out, queue = [], deque([self.root])
        while queue:
            node = queue.popleft()
            out.append(node)
            queue.extend(node.children)
        return out


def backpropagate(node: Node, value: float) -> None:
    """Add one visit and `value` to the node and every ancestor up to the root."""
    while node is not None:
        node.update(value)
        node = node.parent


def selection_score(child: Node, parent: Node, cfg: SearchConfig, siblings: int) -> float:
    if cfg.unvisited == "first" and child.visits == 0:
        return math.inf
    if cfg.selection == "puct":
        return child.q + cfg.c_puct * (1.0 / siblings) * math.sqrt(parent.visits) / (1 + child.visits)
    if child.visits > 0 and parent.visits > 0:
        return child.q + cfg.c_puct * math.sqrt(math.log(parent.visits) / child.visits)
    return child.q


def select_child(node: Node, cfg: SearchConfig) -> Node | None:
    """One selection step: the node itself when it still needs expanding, else its best live child,
    else None (and the node is marked exhausted)."""
    if node.terminal or node.exhausted:
        return None
    if not node.children:
        return node
    live = [c for c in node.children if not c.terminal and not c.exhausted]
    if not live:
        node.exhausted = True
        return None
    best, best_score = None, -math.inf
    for child in live:
        score = selection_score(child, node, cfg, len(node.children))
        if score > best_score:  # strict: ties go to the first child
            best, best_score = child, score
    return best


# --- steps ---------------------------------------------------------------------------------------


def boxed_answer(text: str) -> str | None:
    from mathctl.grading import extract_boxed_all

    found = extract_boxed_all(text)
    if not found:
        return None
    answer = re.sub(r"\\text\{([^{}]*)\}", r"\1", found[-1]).strip()
    return answer or None


def block_code(path_text: str, step_text: str, fmt: StepFormat) -> str | None:
    """The Python program a code step runs: its whole open block (from the last `<code>`), markers
    removed. None when the step is not inside a code block."""
    full = path_text + step_text
    start = full.rfind(fmt.code_start)
    if start < 0:
        return None
    closed = full.find(fmt.code_end, start)
    if closed >= 0 and closed < len(path_text):
        return None  # the block closed in an earlier step: this step is outside it
    body = full[start + len(fmt.code_start):]
    if closed >= 0:
        body = body[: closed - start - len(fmt.code_start)]
    return body.replace(fmt.step_end, "\n")


@dataclass
class Child:
    """A sampled continuation on its way to becoming a node."""

    text: str
    finish_reason: str
    stopped_by: Any
    program: str | None = None


def classify(node: Node, child: Node, sample: Child, cfg: SearchConfig, fmt: StepFormat) -> None:
    """Set the terminal flags of a fresh child that needs no execution result."""
    answer = boxed_answer(sample.text) if "boxed" in sample.text else None
    if answer is not None:
        child.terminal, child.reason, child.answer = True, VALID, answer
    elif "boxed" in sample.text or (fmt.kind == "code" and sample.stopped_by == fmt.answer_end):
        child.terminal, child.reason = True, "no_answer"  # an answer step without a readable answer
    elif sample.finish_reason == "length" or (sample.finish_reason == "stop" and not isinstance(sample.stopped_by, str)):
        child.terminal, child.reason = True, "no_answer"  # ended (EOS) or ran out of tokens without an answer
    elif child.depth >= cfg.max_depth:
        child.terminal, child.reason = True, "too_deep"


def transform(raw: float, cfg: SearchConfig) -> float:
    if cfg.ppm_transform == "tanh":
        return math.tanh(raw / cfg.ppm_scale)
    if cfg.ppm_transform == "sigmoid":
        return 2.0 / (1.0 + math.exp(-raw / cfg.ppm_scale)) - 1.0
    return raw


# --- the search ----------------------------------------------------------------------------------


@dataclass
class Callbacks:
    generate: Callable[[list[str], list[int], Any], list[list[Any]]]   # prompts, seeds, sampling -> samples
    execute: Callable[[list[str]], list[Any]] | None = None              # programs -> ExecResult
    score: Callable[[list[tuple[str, list[str]]]], list[float]] | None = None  # (question, steps) -> raw PPM
    grade: Callable[[list[str], list[Any]], list[bool]] | None = None   # answers, golds -> correct


@dataclass
class Stats:
    engine_calls: int = 0
    generated: int = 0
    executions: int = 0
    ppm_calls: int = 0
    ppm_scored: int = 0


def node_seed(tree: Tree, node: Node) -> int:
    import zlib

    return zlib.crc32(f"{tree.id}:{node.tag}".encode())


class Searcher:
    """Grows a batch of trees with one engine call per expansion level."""

    def __init__(self, cfg: SearchConfig, fmt: StepFormat, callbacks: Callbacks, *, seed: int = 0,
                 sampling_factory: Callable[..., Any] | None = None):
        self.cfg, self.fmt, self.cb, self.seed = cfg, fmt, callbacks, seed
        self.stats = Stats()
        self._sampling_factory = sampling_factory

    # -- expansion shared by all modes ----------------------------------------------------------
    def _sampling(self, n: int, temperature: float):
        from mathctl.core.config import SamplingConfig

        make = self._sampling_factory or SamplingConfig
        return make(n=n, temperature=temperature, top_p=self.cfg.top_p if temperature > 0 else 1.0,
                    top_k=self.cfg.top_k if temperature > 0 else None, max_new_tokens=self.cfg.max_step_tokens,
                    stop=self.fmt.stops(), include_stop_str=True, seed=self.seed)

    def expand(self, targets: list[tuple[Tree, Node]], *, n: int, temperature: float,
               kill_on_error: bool = False) -> list[Node]:
        """Sample, parse, run code, grade and PPM-score the children of every target node.
        Returns the new children (already attached); values are left to the caller."""
        if not targets:
            return []
        from mathctl.engines import ChatText

        # the rendered question and the steps so far: tokenised as rendered (one BOS, the template's)
        prompts = [ChatText(tree.prompt + node.path_text()) for tree, node in targets]
        seeds = [node_seed(tree, node) for tree, node in targets]
        outputs = self.cb.generate(prompts, seeds, self._sampling(n, temperature))
        self.stats.engine_calls += 1
        fresh: list[tuple[Tree, Node, Child]] = []
        for (tree, node), samples in zip(targets, outputs):
            self.stats.generated += len(samples)
            seen: set[str] = set()
            kept: list[Child] = []
            for s in samples:
                text = s.text
                if self.cfg.dedup:
                    if text in seen:
                        continue
                    seen.add(text)
                kept.append(Child(text=text, finish_reason=s.finish_reason, stopped_by=s.stop_reason))
            if self.cfg.first_answer_only:
                answers = [c for c in kept if "boxed" in c.text or c.stopped_by == self.fmt.answer_end]
                if answers:
                    kept = answers[:1]
            for k, c in enumerate(kept, start=len(node.children) + 1):
                child = Node(tag=f"{node.tag}.{k}", text=c.text, depth=node.depth + 1, parent=node)
                node.children.append(child)
                classify(node, child, c, self.cfg, self.fmt)
                fresh.append((tree, child, c))
        self._run_code(fresh, kill_on_error)
        self._grade([(tree, child) for tree, child, _ in fresh])
        self._score([(tree, child) for tree, child, _ in fresh])
        return [child for _, child, _ in fresh]

    def _run_code(self, fresh: list[tuple[Tree, Node, Child]], kill_on_error: bool) -> None:
        if self.fmt.kind != "code":
            return
        jobs = []
        for _, child, c in fresh:
            if child.terminal:
                continue
            if c.stopped_by not in (self.fmt.step_end, self.fmt.code_end):
                continue
            program = block_code(child.parent.path_text(), child.text, self.fmt)
            if program is not None:
                jobs.append((child, c, program))
        if not jobs:
            return
        if self.cb.execute is None:
            raise RuntimeError("code steps need an execute callback (the sandbox)")
        results = self.cb.execute([p for _, _, p in jobs])
        self.stats.executions += len(jobs)
        for (child, c, _), result in zip(jobs, results):
            closes = c.stopped_by == self.fmt.code_end
            if result.error is None:
                child.errors = 0
            else:
                child.error = result.error
                child.errors = child.parent.errors + 1
            if closes or (child.error and child.errors >= self.cfg.errors_threshold):
                observation = result.observation().strip()
                child.text += f"\n{self.fmt.output_start}{observation}{self.fmt.output_end}"
            if child.error and kill_on_error:
                child.terminal, child.reason = True, "code_error"
            elif child.error and child.errors >= self.cfg.errors_threshold:
                child.terminal, child.reason = True, "too_many_errors"
            elif child.depth >= self.cfg.max_depth:
                child.terminal, child.reason = True, "too_deep"

    def _grade(self, fresh: list[tuple[Tree, Node]]) -> None:
        todo = [(tree, child) for tree, child in fresh if child.valid_answer and tree.gold is not None]
        if not todo or self.cb.grade is None:
            return
        verdicts = self.cb.grade([child.answer for _, child in todo], [tree.gold for tree, _ in todo])
        for (_, child), ok in zip(todo, verdicts):
            child.correct = bool(ok)

    def _score(self, fresh: list[tuple[Tree, Node]]) -> None:
        if self.cb.score is None or not fresh:
            return
        todo = [(tree, child) for tree, child in fresh if not child.terminal or child.valid_answer]
        if not todo:
            return
        raw = self.cb.score([(tree.question, [n.text for n in child.path()]) for tree, child in todo])
        self.stats.ppm_calls += 1
        self.stats.ppm_scored += len(todo)
        for (_, child), r in zip(todo, raw):
            child.ppm = transform(float(r), self.cfg)

    # -- values ---------------------------------------------------------------------------------
    def assign_values(self, children: list[Node]) -> None:
        cfg = self.cfg
        for child in children:
            if child.terminal and not child.valid_answer:
                if cfg.invalid_backprop:
                    backpropagate(child, cfg.negative_reward)
                else:
                    child.update(cfg.negative_reward)
            elif child.terminal:
                if cfg.terminal_reward == "gold" and child.correct is not None:
                    r = cfg.positive_reward if child.correct else cfg.negative_reward
                elif child.ppm is not None:
                    r = child.ppm
                else:
                    r = 0.0  # no gold and no PPM: the path carries no signal
                backpropagate(child, r)
            elif child.ppm is not None and cfg.ppm_prior:
                child.update(child.ppm)

    # -- modes ----------------------------------------------------------------------------------
    def run(self, trees: list[Tree], on_iteration: Callable[[int], None] | None = None) -> None:
        if self.cfg.mode == "beam":
            self.beam(trees)
        elif self.cfg.mode == "greedy":
            self.mcts(trees, iterations=1, n=1, temperature=0.0, on_iteration=on_iteration)
        else:
            self.mcts(trees, iterations=self.cfg.iterations, n=self.cfg.n_generate_sample,
                      temperature=self.cfg.temperature, on_iteration=on_iteration)

    def mcts(self, trees: list[Tree], *, iterations: int, n: int, temperature: float,
             on_iteration: Callable[[int], None] | None = None) -> None:
        for iteration in range(iterations):
            for tree in trees:
                tree.cursor = select_child(tree.root, self.cfg)
            for _ in range(self.cfg.max_depth + 1):
                live = [t for t in trees if t.cursor is not None and not t.cursor.terminal]
                if not live:
                    break
                to_expand = [(t, t.cursor) for t in live if not t.cursor.children]
                new = self.expand(to_expand, n=n, temperature=temperature)
                self.assign_values(new)
                for tree in live:
                    tree.cursor = select_child(tree.cursor, self.cfg)
            if on_iteration is not None:
                on_iteration(iteration + 1)

    def beam(self, trees: list[Tree]) -> None:
        """Step-level beam search: expand every beam node, score children with the PPM, move answers to
        the pool (each shrinks that tree's beam by one), keep the best live children."""
        if self.cb.score is None:
            raise RuntimeError("beam search needs a PPM")
        beams = {id(t): [t.root] for t in trees}
        widths = {id(t): self.cfg.beam_width for t in trees}
        for _ in range(self.cfg.max_depth):
            targets = [(t, node) for t in trees for node in beams[id(t)]]
            if not targets:
                break
            new = self.expand(targets, n=self.cfg.n_generate_sample, temperature=self.cfg.temperature,
                              kill_on_error=True)
            for child in new:
                if child.ppm is not None:
                    child.update(child.ppm)
                elif child.terminal:
                    child.update(self.cfg.negative_reward)
            by_tree: dict[int, list[Node]] = {id(t): [] for t in trees}
            owner = {id(node): t for t, node in targets}
            for child in new:
                by_tree[id(owner[id(child.parent)])].append(child)
            for tree in trees:
                ranked = sorted(by_tree[id(tree)], key=lambda c: -(c.ppm if c.ppm is not None else -math.inf))
                keep = []
                for child in ranked:
                    if child.valid_answer:
                        tree.answers.append(child)
                        widths[id(tree)] = max(widths[id(tree)] - 1, 0)
                    elif not child.terminal:
                        keep.append(child)
                beams[id(tree)] = keep[: widths[id(tree)]]


# --- results -------------------------------------------------------------------------------------


def chosen_answer(tree: Tree, mode: str) -> Node | None:
    """The answer a search returns: beam: the pool's best PPM value; otherwise the valid terminal with
    the highest Q (ties: the first in breadth-first order), as rStar's eval_output.py."""
    if mode == "beam":
        pool = [n for n in tree.answers]
        return max(pool, key=lambda n: n.ppm if n.ppm is not None else -math.inf) if pool else None
    best, best_q = None, -math.inf
    for node in tree.nodes():
        if node.valid_answer and node.q > best_q:
            best, best_q = node, node.q
    return best


def leaf_counts(root: Node) -> dict[int, tuple[int, int]]:
    """For each node (by id), how many correct and wrong answer leaves lie below it (itself included).
    Correct: a valid answer graded right. Wrong: a wrong answer, or a path that ended without one
    (no_answer, too_deep). Code-error terminals count as neither (as rStar)."""
    counts: dict[int, tuple[int, int]] = {}

    def visit(node: Node) -> tuple[int, int]:
        good = bad = 0
        if node.terminal:
            if node.valid_answer and node.correct:
                good = 1
            elif (node.valid_answer and node.correct is False) or node.reason in ("no_answer", "too_deep"):
                bad = 1
        for child in node.children:
            g, b = visit(child)
            good, bad = good + g, bad + b
        counts[id(node)] = (good, bad)
        return good, bad

    visit(root)
    return counts


def trace_ok(path: list[Node]) -> bool:
    return bool(path) and path[-1].valid_answer and bool(path[-1].correct) and not any(n.error for n in path)


_OUTPUT = re.compile(r"<output>(.*?)<end_of_output>", re.S)


def answer_matches_output(path: list[Node]) -> bool:
    """The answer agrees with the last code output on the path (True when nothing was executed): a
    policy can box the right number while its program printed another one."""
    from mathctl.grading import is_equivalent

    outputs = [m.group(1).strip() for n in path for m in _OUTPUT.finditer(n.text)]
    if not outputs or path[-1].answer is None:
        return True
    return outputs[-1] == path[-1].answer or is_equivalent(outputs[-1], path[-1].answer)


def sft_traces(tree: Tree, top_n: int = 2, *, require_output_match: bool = False) -> list[dict[str, Any]]:
    """The top `top_n` correct root-to-leaf paths, by mean then min step Q, none with a code error
    (and, with `require_output_match`, none whose answer disagrees with its last code output)."""
    paths = []
    for node in tree.nodes():
        if not node.children and node.parent is not None:
            path = node.path()
            if trace_ok(path) and (not require_output_match or answer_matches_output(path)):
                qs = [n.q for n in path]
                paths.append((sum(qs) / len(qs), min(qs), node.tag, path))
    paths.sort(key=lambda p: (-p[0], -p[1]))
    out = []
    for mean_q, min_q, tag, path in paths[:top_n]:
        out.append({"id": tree.id, "problem": tree.question, "response": "".join(n.text for n in path),
                    "answer": path[-1].answer, "leaf": tag, "mean_q": round(mean_q, 6), "min_q": round(min_q, 6)})
    return out


class PairsConfig(Strict):
    """rStar-Math's PPM pair construction (extra_rm_file.py, sample_rm_data.py)."""

    per_side: int = Field(2, ge=1, description="Positives and negatives taken per node.")
    one_sided_max: int = Field(4, ge=1, description="Taken from the other side when one side has a single candidate.")
    min_margin: float = Field(0.5, ge=0, description="Q(pos) - Q(neg) at least this.")
    min_edit_distance: int = Field(20, ge=0, description="Character edit distance between pos and neg at least this.")
    check_continuations: bool = Field(True, description="Also require the mean Q along pos's best continuation to "
                                      "exceed that along neg's worst one.")


def _continuation_mean(node: Node, best: bool) -> float:
    qs, cur = [node.q], node
    while cur.children:
        cur = (max if best else min)(cur.children, key=lambda c: c.q)
        qs.append(cur.q)
    return sum(qs) / len(qs)


def edit_distance(a: str, b: str, cap: int | None = None) -> int:
    """Levenshtein distance; stops early once every entry of a row exceeds `cap`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        if cap is not None and min(current) > cap:
            return min(current)
        previous = current
    return previous[-1]


def ppm_pairs(tree: Tree, cfg: PairsConfig) -> list[dict[str, Any]]:
    """Preference pairs of sibling steps: high-Q children with a correct answer below against low-Q
    children with a wrong one below, breadth-first through every node with both below."""
    counts = leaf_counts(tree.root)
    out: list[dict[str, Any]] = []
    queue = deque([tree.root])
    while queue:
        parent = queue.popleft()
        good = sorted([c for c in parent.children if counts[id(c)][0] > 0], key=lambda c: -c.q)
        bad = sorted([c for c in parent.children if counts[id(c)][1] > 0], key=lambda c: c.q)
        take_good = take_bad = cfg.per_side
        if len(good) == 1:
            take_bad = cfg.one_sided_max
        if len(bad) == 1:
            take_good = cfg.one_sided_max
        pos, neg = good[:take_good], bad[:take_bad]
        prefix = [n.text for n in parent.path()]
        for p in pos:
            for q in neg:
                if p is q:
                    continue
                margin = p.q - q.q
                if margin <= 0 or margin < cfg.min_margin:
                    continue
                if cfg.check_continuations and not _continuation_mean(p, True) > _continuation_mean(q, False):
                    continue
                if edit_distance(p.text, q.text, cap=cfg.min_edit_distance) < cfg.min_edit_distance:
                    continue
                out.append({"id": tree.id, "question": tree.question, "prefix": prefix, "pos": p.text, "neg": q.text,
                            "pos_count": len(pos), "neg_count": len(neg), "pos_q": round(p.q, 6),
                            "neg_q": round(q.q, 6), "margin": round(margin, 6), "node": parent.tag})
        for child in parent.children:
            g, b = counts[id(child)]
            if g > 0 and b > 0:
                queue.append(child)
    return out


def tree_record(tree: Tree, mode: str) -> dict[str, Any]:
    """trees.jsonl row: the problem, the chosen answer and every node."""
    chosen = chosen_answer(tree, mode)
    nodes = tree.nodes()
    solved = any(n.valid_answer and n.correct for n in nodes)
    return {
        "id": tree.id, "question": tree.question, "gold": tree.gold, "mode": mode,
        "answer": chosen.answer if chosen else None, "answer_node": chosen.tag if chosen else None,
        "correct": bool(chosen and chosen.correct), "solved": solved, "num_nodes": len(nodes) - 1,
        "nodes": [{"tag": n.tag, "parent": n.parent.tag if n.parent else None, "depth": n.depth, "text": n.text,
                   "visits": n.visits, "q": round(n.q, 6), "value": n.value, "ppm": n.ppm, "terminal": n.terminal,
                   "reason": n.reason, "answer": n.answer, "correct": n.correct, "error": n.error,
                   "errors": n.errors} for n in nodes],
    }


def tree_from_record(record: dict[str, Any], prompt: str = "") -> Tree:
    """Rebuild a tree from its trees.jsonl row (for pair/trace extraction from saved trees)."""
    tree = Tree(id=record["id"], question=record["question"], gold=record.get("gold"), prompt=prompt)
    by_tag: dict[str, Node] = {}
    for row in record["nodes"]:
        if row["parent"] is None:
            node = tree.root
        else:
            parent = by_tag[row["parent"]]
            node = Node(tag=row["tag"], parent=parent)
            parent.children.append(node)
        node.text, node.depth, node.visits = row["text"], row["depth"], row["visits"]
        node.value_sum = row["q"] * row["visits"]
        for key in ("value", "ppm", "terminal", "reason", "answer", "correct", "error", "errors"):
            setattr(node, key, row[key])
        by_tag[row["tag"]] = node
    return tree


__all__ = ["Callbacks", "Node", "PairsConfig", "SearchConfig", "Searcher", "StepFormat", "Tree", "backpropagate",
           "block_code", "chosen_answer", "edit_distance", "leaf_counts", "ppm_pairs", "select_child", "sft_traces",
           "tree_from_record", "tree_record"]
