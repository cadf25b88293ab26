"""Find the final answer a model's response states.

`extract_answer(text)` returns the raw answer string (not normalised: `mathctl.grading.normalize` owns every
spelling policy, so extraction stays lossless) or None. It is called for every eval sample and every GRPO
rollout, so it is pure Python, runs in time linear in the input and never raises.

Rules, in priority order. The first rule that finds something decides; later rules are not consulted.

1. Boxed. The last top-level `\\boxed{...}` or `\\fbox{...}` whose braces close (nesting counted; the
   escaped braces `\\{` `\\}` of a set are not counted). The brace-less form `\\boxed 5` / `\\boxed5` takes
   the token up to the next whitespace, `$` or brace. A box nested inside another box is part of the outer
   box's content. Empty boxes are skipped; when every closed box is empty (`within \\boxed{}`, the prompt's
   words echoed) the later rules read the text, as if there were no box. A box that never closes (a truncated response)
   does not count. The box content is returned as written: `\\text{(B)}` stays `\\text{(B)}` (normalisation
   turns it into `B`), so nothing is lost when the box holds a choice label and a value.
2. GSM8K: the text after the last `####`, to the end of its line (`#### 1,234` -> `1,234`).
3. Minerva/MATH: `Final Answer: The final answer is X. I hope it is correct.` -> X (last one; `$...$` is
   removed when it wraps X whole, the period before "I hope" is dropped).
4. Answer statements: the last "the answer is X", "the final answer is: X", "answers are X", "answer
   should/would/will be X", "Answer: X", "**Answer:** X", `答案是 X` (case-insensitive). X runs to the end of
   the sentence (a `.`/`。` followed by whitespace, outside `$...$`) or line; when nothing follows the
   marker on its line, the next non-empty line is used, and a display block (`$$...$$`, `\\[...\\]`) that
   starts there is taken whole. Markdown `*` emphasis, a trailing period and `$`/`\\(` wrappers around the
   whole of X are removed. When X is a choice label (`C`, `(C)`, `C.`, `\\text{(C)}`, or starts with
   `(C)`), the letter is returned.
5. Multiple choice phrases, letters A-E only: "the correct option is D", "the right choice: (B)",
   "option C is correct" -> the letter. (This runs before rule 6, not after as first sketched: an explicit
   statement of the choice is stronger evidence than the last printed value.)
6. Code output (rStar-style code-augmented steps): the last `<output> ... <end_of_output>` block or
   Markdown "```output" block, whichever comes later. A one-line output is taken whole; for a multi-line
   output the last non-empty line is taken (the final print is usually the result).
7. Bare answer: the whole response, when it is "short and wrapper-free": after stripping whitespace and an
   enclosing `$...$`/`\\(...\\)`/`$$...$$`, it is one line, at most 60 characters, has at most 3 words of
   two or more letters outside LaTeX command names (`\\frac` is not a word, `Yes` is), has a letter or
   digit, does not end with `?` or `:` and contains no `\\boxed`. `(C)` alone gives `C`.

Rules 8-10 read prose, and only run when the response has words, does not end with `?`, and has neither
a `\\boxed` that never closed nor an answer marker with nothing after it (a truncated response's answer is
missing, not somewhere else):

8. "the result is X" (last one), X taken as in rule 4.
9. The last display or inline math span (`\\[...\\]`, `$$...$$` over several lines, `$...$`, `\\(...\\)`)
   or the last Markdown bold span holding a digit (`**42**`), whichever ends later. A math span that only
   names a variable (`$x$`, `$f(x)$`: no digit and at most 4 characters besides command names) is skipped.
10. The last number in the text (`42`, `-3`, `1,250`, `0.75`, `3/4`).

Otherwise None (also for non-strings and empty text).

Not covered, on purpose or for now:
- Numbers written as words ("so x must be five"); rule 10 reads "It's 42, I think." as 42, and any
  number a rambling response ends with as its answer.
- Choice letters outside A-E, lower-case letters, or choices stated any other way ("I pick B").
- "The answer is X" where X spans several sentences or lines (only the first sentence is taken), or is a
  list written with sentence periods.
- Boxes inside code blocks or quoted text are treated like any other box; we do not parse Markdown.
- Double-escaped output (`\\\\boxed{5}`) is accepted as a box, but its braces are counted as written.
- A response that changes its mind after a box ("\\boxed{3}... no wait, 4") is graded on the box.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_boxed_all", "matching_braces"]

# An escaped brace or backslash pair, or a bare brace. Scanning only these tokens (not every character)
# keeps brace matching fast on long responses.
_BRACE_TOKEN_RE = re.compile(r"\\[\\{}]|[{}]")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The brace-less form: `\boxed 5.` -> `5`. Stops at whitespace, `$` and braces.
_BARE_BOX_TOKEN_RE = re.compile(r"[^\s${}]+")

_MINERVA_MARKER = "final answer is"
_MINERVA_TAIL = "i hope it is correct"

# "answer is", "answers are", "answer should be", "Answer:", "**Answer:**", "答案是". Every repeated
# whitespace class is separated from the next one by a literal, so the pattern cannot backtrack
# quadratically on long runs of spaces.
_ANSWER_MARKER_RE = re.compile(
    r"(?i:\banswers?\b[ \t*]*(?:(?:is|are|should[ \t]+be|would[ \t]+be|will[ \t]+be)(?![\w'])[ \t]*:?|[:：]))"
    r"|答案(?:是|为|：|:)"
)
# A choice label standing for the whole answer: `C`, `(C)`, `C.`, `C)`; or a leading `(C)`/`C)` followed by
# the option's text ("(C) 12", "C) 12").
_CHOICE_WHOLE_RE = re.compile(r"\(?([A-E])\)?[.:]?")
_CHOICE_LEAD_RE = re.compile(r"(?:\(([A-E])\)|([A-E])\))(?=[\s:.,])")
_CHOICE_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{|[{}*$]")
_MC_PHRASE_RE = re.compile(
    r"(?i:\b(?:correct|right|best)[ \t]+(?:option|choice|answer)[ \t]*"
    r"(?:(?:is|would[ \t]+be|will[ \t]+be|should[ \t]+be)[ \t]*)?(?:[:：][ \t]*)?)"
    r"(?:\(([A-E])\)|([A-E]))(?![A-Za-z0-9])"
    r"|(?i:\b(?:option|choice)[ \t]*)(?:\(([A-E])\)|([A-E]))"
    r"[ \t]+(?i:is[ \t]+(?:the[ \t]+)?(?:correct|right))"
)
# Sentence splitter for answer statements: escaped characters are skipped, `$` toggles math mode, and a
# period (ASCII or CJK) followed by whitespace or the end ends the sentence outside math.
_SENTENCE_TOKEN_RE = re.compile(r"\\.|\$|[.。](?=\s|$)", re.S)
_NONSPACE_RE = re.compile(r"\S")
_WORD_RE = re.compile(r"\\[A-Za-z]+|[A-Za-z]{2,}")
# Math delimiters: a LaTeX line break and an escaped dollar are tokens only so that they are skipped.
_MATH_TOKEN_RE = re.compile(r"\\\\|\\\$|\\[()\[\]]|\$\$|\$")
_MATH_CLOSER = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_COMMAND_NAME_RE = re.compile(r"\\[A-Za-z]+|\s")
_BOLD_RE = re.compile(r"\*\*([^*\n]{1,200})\*\*")
# A number in prose: `42`, `-3`, `1,250`, `0.75`, `3/4`.
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# "the result is X": an answer statement weaker than "answer", used when no answer marker is found.
_RESULT_MARKER_RE = re.compile(r"(?i:\bresult[ \t]+is\b[ \t]*:?)")
_EMPTY_BOX_RE = re.compile(r"\\boxed\s*\{\s*\}")  # `\boxed{}`: the prompt's words echoed, not an answer
_BARE_MAX_CHARS = 60
_BARE_MAX_WORDS = 3
# How far a display block (`$$ ... $$`) after an answer marker may extend.
_DISPLAY_WINDOW = 10_000


def matching_braces(text: str, opens: set[int] | None = None) -> dict[int, int]:
    """Map the index of each `{` in `text` to the index of its matching `}` (unmatched braces are absent).

    `\\{` and `\\}` are escaped (LaTeX set braces) and do not count; `\\\\{` is a line break then a brace,
    which does. With `opens`, only those opening positions are recorded (memory stays small on huge input).
    Linear time.
    """
    stack: list[int] = []
    out: dict[int, int] = {}
    for m in _BRACE_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            start = stack.pop()
            if opens is None or start in opens:
                out[start] = m.start()
    return out


def _strip(text: str) -> str:
    """`str.strip`, but a form feed/tab/backspace/CR right before a letter is kept: it is a LaTeX backslash
    that a JSON escape ate (`\\f` + `rac`), which normalisation repairs."""
    out = text.strip()
    lead = len(text) - len(text.lstrip())
    if out and lead > 0 and text[lead - 1] in "\x0c\t\x08\r" and out[0].isalpha():
        return text[lead - 1 :].rstrip()
    return out


def _strip_wrappers(ans: str) -> str:
    """Remove whitespace, Markdown `*`, a trailing period and a `$...$` / `\\(...\\)` wrapping the whole."""
    ans = _strip(ans)
    for _ in range(3):  # "**$5$.**" needs a few rounds; bounded so odd input cannot loop
        before = ans
        ans = ans.strip(" *").rstrip(" .。")  # Markdown emphasis around or after the answer
        ans = _strip_math_wrapper(ans)
        if ans == before:
            break
    return _strip(ans)


def _strip_math_wrapper(ans: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]` -> `x`, only when one pair wraps the whole."""
    for left, right in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
        if len(ans) >= len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
            inner = ans[len(left) : len(ans) - len(right)]
            if left == "$" and "$" in inner.replace("\\$", ""):
                return ans  # "$2$ or $3$": two math spans, not one wrapper
            return _strip(inner)
    return ans


def _boxes(text: str) -> list[str]:
    """Contents of the top-level closed boxes, in order (see rule 1)."""
    markers = []  # (marker start, position after the marker and any spaces)
    for m in _BOX_RE.finditer(text):
        p = m.end()
        while p < len(text) and text[p] in " \t":
            p += 1
        markers.append((m.start(), p))
    if not markers:
        return []
    opens = {p for _, p in markers if p < len(text) and text[p] == "{"}
    close = matching_braces(text, opens) if opens else {}
    out: list[str] = []
    covered_until = -1  # end of the last accepted box; markers before it are nested inside it
    for start, p in markers:
        if start < covered_until:
            continue
        if p < len(text) and text[p] == "{":
            end = close.get(p)
            if end is None:
                continue  # never closes: a truncated response, not an answer
            out.append(_strip(text[p + 1 : end]))
            covered_until = end + 1
        else:
            m = _BARE_BOX_TOKEN_RE.match(text, p)
            if m is None:
                continue
            out.append(m.group().rstrip(".,;"))
            covered_until = m.end()
    return out


def extract_boxed_all(text: str) -> list[str]:
    """All top-level `\\boxed{...}` / `\\fbox{...}` contents (and brace-less `\\boxed 5` tokens), in order.

    Contents are stripped of surrounding whitespace; empty boxes appear as "". Boxes that never close are
    left out, and a box nested in another is part of the outer content (so the total output size stays
    linear in the input). Never raises; non-strings give [].
    """
    if not isinstance(text, str):
        return []
    try:
        return _boxes(text)
    except Exception:  # a grader must not crash a training run on odd output
        return []


def _from_gsm8k(text: str) -> str | None:
    pos = text.rfind("####")
    if pos < 0:
        return None
    eol = text.find("\n", pos)
    ans = _strip_wrappers(text[pos + 4 : eol if eol >= 0 else len(text)])
    return ans or None


def _from_minerva(text: str) -> str | None:
    lower = text.lower()
    pos = lower.rfind(_MINERVA_MARKER)
    if pos < 0:
        return None
    start = pos + len(_MINERVA_MARKER)
    eol = lower.find("\n", start)
    eol = len(text) if eol < 0 else eol
    tail = lower.find(_MINERVA_TAIL, start, eol)
    if tail < 0:
        return None  # no "I hope it is correct": rule 4 reads it as an ordinary answer statement
    ans = _strip_wrappers(text[start:tail])
    return ans or None


def _cut_sentence(line: str) -> str:
    """The first sentence of `line`: up to a period followed by whitespace, not counting those in `$...$`."""
    in_math = False
    for m in _SENTENCE_TOKEN_RE.finditer(line):
        tok = m.group()
        if tok == "$":
            in_math = not in_math
        elif tok in ".。" and not in_math:
            return line[: m.start()]
    return line


def _statement_after(text: str, pos: int) -> str:
    """The answer that follows an answer marker ending at `pos` (see rule 4)."""
    n = len(text)
    while pos < n and text[pos] in " \t*:：":
        pos += 1
    if pos < n and text[pos] in "\r\n":
        m = _NONSPACE_RE.search(text, pos)
        if m is None:
            return ""
        pos = m.start()
    for left, right in (("$$", "$$"), ("\\[", "\\]")):
        if text.startswith(left, pos):
            end = text.find(right, pos + len(left), pos + _DISPLAY_WINDOW)
            if end >= 0:
                return text[pos + len(left) : end].strip()
    eol = text.find("\n", pos)
    return _cut_sentence(text[pos : eol if eol >= 0 else n])


def _choice_letter(ans: str) -> str | None:
    """The letter when `ans` is a choice label (`C`, `(C)`, `\\text{(C)}`, `(C) 12`), else None."""
    bare = _CHOICE_WRAPPER_RE.sub("", ans).strip()
    m = _CHOICE_WHOLE_RE.fullmatch(bare)
    if m:
        return m.group(1)
    m = _CHOICE_LEAD_RE.match(bare)
    if m:
        return m.group(1) or m.group(2)
    return None


def _from_statement(text: str) -> str | None:
    if "answer" not in text.lower() and "答案" not in text:
        return None  # cheap pre-check: most responses that get here have no marker at all
    last = None
    for last in _ANSWER_MARKER_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    ans = _strip_wrappers(_statement_after(text, last.end()))
    if not ans:
        return None
    return _choice_letter(ans) or ans


def _from_result_statement(text: str) -> str | None:
    if "result" not in text.lower():
        return None
    last = None
    for last in _RESULT_MARKER_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    return _strip_wrappers(_statement_after(text, last.end())) or None


def _from_choice_phrase(text: str) -> str | None:
    lower = text.lower()
    if "option" not in lower and "choice" not in lower and "answer" not in lower:
        return None  # both phrase patterns need one of these words
    last = None
    for last in _MC_PHRASE_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    return next(g for g in last.groups() if g)


def _from_code_output(text: str) -> str | None:
    best, content = -1, None
    end = text.rfind("<end_of_output>")
    if end >= 0:
        start = text.rfind("<output>", 0, end)
        if start >= 0:
            best, content = start, text[start + len("<output>") : end]
    start = text.rfind("```output")
    if start > best:
        body = start + len("```output")
        end = text.find("```", body)
        if end >= 0:
            content = text[body:end]
    if content is None:
        return None
    lines = [line.strip() for line in content.splitlines() if line.strip()]
    if not lines:
        return None
    return _strip_wrappers(lines[-1]) or None


def _from_bare(text: str) -> str | None:
    ans = _strip_wrappers(text)
    if not ans or len(ans) > _BARE_MAX_CHARS or "\n" in ans or "\r" in ans:
        return None
    if ans.endswith(("?", ":")) or "\\boxed" in ans or "\\fbox" in ans or not any(c.isalnum() for c in ans):
        return None
    math_at = min((i for i in (ans.find("$"), ans.find("\\(")) if i >= 0), default=-1)
    if math_at > 0 and _WORD_RE.search(ans, 0, math_at):
        return None  # prose around math ("so $x = 12$"): the math span rule takes the math
    words = sum(1 for w in _WORD_RE.findall(ans) if not w.startswith("\\"))
    if words > _BARE_MAX_WORDS:
        return None
    m = re.fullmatch(r"\(([A-E])\)", ans)
    return m.group(1) if m else ans


def _math_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the contents of every closed `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`, in order.
    One pass over the delimiter tokens; `\\$` and `\\\\` are skipped, a span never holds another.

    A single `$` follows pandoc's rule, so that prices are not math: it opens only with a non-space right
    after it, closes only with a non-space right before it and no digit right after it, and a span never
    crosses a blank line. In "made $50,000.\\n\\nSo the profit of $" no span opens and closes."""
    spans = []
    closer, start = None, 0
    for m in _MATH_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok in ("\\\\", "\\$"):
            continue
        if closer == "$" and tok == "$":
            before, after = text[m.start() - 1], text[m.end():m.end() + 1]
            if not before.isspace() and not after.isdigit() and "\n\n" not in text[start:m.start()]:
                spans.append((start, m.start()))
                closer = None
                continue
            if after and not after.isspace():
                start = m.end()  # not a closer; it may open a span of its own
            else:
                closer = None
            continue
        if closer is None:
            if tok == "$" and (not text[m.end():m.end() + 1] or text[m.end()].isspace()):
                continue  # "$ 5" or a `$` at the end: not an opener
            if tok in _MATH_CLOSER:
                closer, start = _MATH_CLOSER[tok], m.end()
        elif tok == closer:
            spans.append((start, m.start()))
            closer = None
    return spans


def _from_math_or_bold(text: str) -> str | None:
    """The last display or inline math span, or the last Markdown bold span holding a number, whichever
    ends later. A span naming a variable (`$x$`, `$f(x)$`: no digit, at most 4 characters after removing
    command names) is a mention, not an answer, and is skipped."""
    best_end, best = -1, None
    if "$" in text or "\\(" in text or "\\[" in text:
        for start, end in reversed(_math_spans(text)):
            inner = _strip_wrappers(text[start:end])
            if inner and (any(c.isdigit() for c in inner) or len(_COMMAND_NAME_RE.sub("", inner)) > 4):
                best_end, best = end, inner
                break
    if "**" in text:
        for m in reversed(list(_BOLD_RE.finditer(text))):
            if m.end() <= best_end:
                break
            inner = _strip_wrappers(m.group(1))
            if inner and any(c.isdigit() for c in inner) and not inner.endswith(":"):
                best_end, best = m.end(), inner
                break
    return best


def _from_last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    return last.group().rstrip(".") if last is not None else None


def _extract(text: str) -> str | None:
    boxes = _boxes(text)
    if any(boxes):  # only empty boxes (`within \\boxed{}` echoed from the prompt): not an answer, read on
        return next(b for b in reversed(boxes) if b)
    rules = (_from_gsm8k, _from_minerva, _from_statement, _from_choice_phrase, _from_code_output, _from_bare)
    for rule in rules:
        ans = rule(text)
        if ans:
            return ans
    if not _may_guess(text):
        return None
    for rule in (_from_result_statement, _from_math_or_bold, _from_last_number):
        ans = rule(text)
        if ans:
            return ans
    return None


def _may_guess(text: str) -> bool:
    """Whether the prose rules (8-10) may look at `text`: not when it has a box that never closed or an
    answer marker with nothing after it (a truncated response: its answer is missing, not elsewhere), not
    when it ends in a question, and only when it has words (bare lines of numbers are ambiguous)."""
    if _BOX_RE.search(_EMPTY_BOX_RE.sub("", text)) or _ANSWER_MARKER_RE.search(text):
        return False
    return not text.rstrip().endswith("?") and _WORD_RE.search(text) is not None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a model response, as written, or None (rules in the module docstring).

    Never raises: a non-string, empty or unparseable response gives None.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        return _extract(text)
    except Exception:  # a grader must not crash a training run on odd output
        return None
