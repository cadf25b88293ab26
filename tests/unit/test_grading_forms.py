r"""Answer forms real models and datasets produce, one table per category (issue 21).

Each row is (response, gold, expected verdict of `grade`). Every category carries near misses (a changed
digit, sign, bound, label or element) that must stay wrong: being lenient about the form must never
accept a wrong value. bench/grader.py reads `CATEGORIES` to compare against math-verify per category.
"""

from __future__ import annotations

import pytest

from mathctl.grading import grade

# --- no box: the answer sits in prose, after a marker, in inline or display math, or in bold -----------
NO_BOX = [
    ("After simplifying, the Answer is 12.", "12", True),
    ("So the result is $\\frac{3}{4}$.", "\\frac{3}{4}", True),
    ("So the result is $\\frac{3}{5}$.", "\\frac{3}{4}", False),
    ("Final Answer: 17", "17", True),
    ("Final Answer: 71", "17", False),
    ("We add them up. Final Answer: $x = -2$", "-2", True),
    ("We add them up. Final Answer: $x = 2$", "-2", False),
    ("The total area is \\( 36\\pi \\).", "36\\pi", True),
    ("The total area is \\( 6\\pi \\).", "36\\pi", False),
    ("Putting it together,\n\\[\n  \\frac{\\sqrt{3}}{2}\n\\]", "\\frac{\\sqrt{3}}{2}", True),
    ("Putting it together,\n\\[\n  \\frac{\\sqrt{2}}{2}\n\\]", "\\frac{\\sqrt{3}}{2}", False),
    ("Therefore\n$$\nx^2 + 2x\n  + 1\n$$", "(x+1)^2", True),
    ("Therefore\n$$\nx^2 + 2x\n  - 1\n$$", "(x+1)^2", False),
    ("The matrix is $\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}$ as required.",
     "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", True),
    ("The matrix is $\\begin{pmatrix} 1 & 2 \\\\ 3 & 5 \\end{pmatrix}$ as required.",
     "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", False),
    ("Adding the two counts gives **42**.", "42", True),
    ("Adding the two counts gives **24**.", "42", False),
    ("The final answer is **$7$**", "7", True),
    ("Counting again we get 30 + 12 = 42 apples in total", "42", True),
    ("Counting again we get 30 + 12 = 43 apples in total", "42", False),
    ("**Answer:** $\\sqrt{5}$", "\\sqrt{5}", True),
    ("**Answer:** $\\sqrt{6}$", "\\sqrt{5}", False),
    ("Thus the value of $x$ is 5.", "5", True),  # `$x$` names the unknown; the number is the answer
    ("Thus the value of $x$ is 6.", "5", False),
    ("We get 5. The answer is ", "5", False),  # truncated right before the answer: no answer
    ("The last step gives \\boxed{5", "5", False),  # a box that never closes
    # the prompt's "within \\boxed{}" echoed as words: an empty box is no answer, the statement after it is
    ("To give the final answer within \\boxed{}, we round it.\n\nThe answer is 50.", "50", True),
    ("To give the final answer within \\boxed{}, we round it.\n\nThe answer is 50.", "5", False),
    ("We write it in \\boxed{} at the end. So the result is 7", "7", True),
    ("We write it in \\boxed{} at the end. So the result is 7", "-7", False),
    # dollar signs as prices are not math delimiters (pandoc's rule); the last number is read instead
    ("The profit is 0.15 * $350,000 = $50,000.\n\nSo, Josh made a profit of $", "50000", True),
    ("The profit is 0.15 * $350,000 = $50,000.\n\nSo, Josh made a profit of $", "70000", False),
    ("He paid $12 and got $3 back, so he spent 9 dollars", "9", True),
    ("He paid $12 and got $3 back, so he spent 9 dollars", "3", False),
    ("It costs $5, so the total is $x = 20$", "20", True),
]

# --- relations and inequalities in any spelling ---------------------------------------------------------
RELATIONS = [
    ("\\boxed{x \\geq 3}", "x \\ge 3", True),
    ("\\boxed{x >= 3}", "x \\geq 3", True),
    ("\\boxed{x > 3}", "x \\geq 3", False),  # strictness is part of the answer
    ("\\boxed{x \\leqslant 5}", "x \\le 5", True),
    ("\\boxed{x \\leqslant 6}", "x \\le 5", False),
    ("\\boxed{x \\lt 2}", "x < 2", True),
    ("\\boxed{x \\gt 2}", "x > 2", True),
    ("\\boxed{x \\gt 2}", "x < 2", False),
    ("\\boxed{x \\neq 1}", "x \\ne 1", True),
    ("\\boxed{x != 1}", "x \\neq 1", True),
    ("\\boxed{x != -1}", "x \\neq 1", False),
    ("\\boxed{y \\in (1, 4]}", "1 < y \\le 4", True),
    ("\\boxed{y \\in [1, 4]}", "1 < y \\le 4", False),
    ("\\boxed{y \\in (1, 5]}", "1 < y \\le 4", False),
    ("\\boxed{1 < y \\leq 4}", "(1, 4]", True),
    ("\\boxed{y = 2+3 = 5}", "5", True),
    ("\\boxed{y = 2+3 = 6}", "5", False),
    ("so $x = 4 \\cdot 3 = 12$.", "12", True),
    ("so $x = 4 \\cdot 3 = 13$.", "12", False),
]

# --- labelled answers against bare ones ------------------------------------------------------------------
LABELLED = [
    ("\\boxed{a=3, b=7}", "3, 7", True),
    ("\\boxed{a=3, b=8}", "3, 7", False),
    ("\\boxed{V_1:V_2=2:5}", "2:5", True),
    ("\\boxed{V_1:V_2=5:2}", "2:5", False),
    ("\\boxed{\\frac{AM}{MB}=\\frac{2}{3}}", "\\frac{2}{3}", True),
    ("\\boxed{\\frac{AM}{MB}=\\frac{3}{2}}", "\\frac{2}{3}", False),
    ("\\boxed{x=1,y=2;x=2,y=1}", "(1,2),(2,1)", True),
    ("\\boxed{x=1,y=2;x=2,y=2}", "(1,2),(2,1)", False),
    ("\\boxed{g(t)=4}", "4", True),
    ("\\boxed{g(t)=5}", "4", False),
    ("\\boxed{f(2) = -1}", "-1", True),
    ("\\boxed{AB = 2\\sqrt{3}}", "2\\sqrt{3}", True),
    ("\\boxed{AB = 3\\sqrt{2}}", "2\\sqrt{3}", False),
    ("\\boxed{CD = 5}", "AB = 5", False),  # a different label is a different quantity
    ("\\boxed{x + 1 = 5}", "5", False),  # an equation, not a label: its answer is x = 4
    ("\\boxed{2x = 6}", "6", False),
]

# --- several boxed answers as one set against the gold's list -----------------------------------------
SEVERAL_BOXES = [
    ("The roots are \\boxed{2}, \\boxed{5}.", "2, 5", True),
    ("The roots are \\boxed{5} and \\boxed{2}.", "2, 5", True),
    ("The roots are \\boxed{2}, \\boxed{6}.", "2, 5", False),
    ("The roots are \\boxed{2}.", "2, 5", False),
    ("$\\boxed{(1, 3)} \\text{ and } \\boxed{(3, 1)}$", "(1,3),(3,1)", True),
    ("$\\boxed{(1, 3)} \\text{ and } \\boxed{(3, 2)}$", "(1,3),(3,1)", False),
    ("So \\boxed{x=-1} or \\boxed{x=4}.", "-1, 4", True),
    ("So \\boxed{x=-1} or \\boxed{x=3}.", "-1, 4", False),
    # a box repeated in a recap is still one answer
    ("We get \\boxed{7}. Checking: yes, \\boxed{7}.", "7", True),
    # an intermediate boxed value followed by the final one: the last box decides when the gold is one value
    ("First \\boxed{3}, then after correcting the sign \\boxed{4}.", "4", True),
    ("First \\boxed{4}, then after correcting the sign \\boxed{3}.", "4", False),
]

# --- golds that are not bare answers ---------------------------------------------------------------------
GOLD_FORMS = [
    ("\\boxed{12}", "$12$", True),
    ("\\boxed{13}", "$12$", False),
    ("\\boxed{\\frac{1}{2}}", "$\\boxed{\\frac{1}{2}}$", True),
    ("\\boxed{\\frac{1}{3}}", "$\\boxed{\\frac{1}{2}}$", False),
    ("\\boxed{9}", "We have $3^2=9$, so the answer is $\\boxed{9}$.", True),
    ("\\boxed{3}", "We have $3^2=9$, so the answer is $\\boxed{9}$.", False),
    ("\\boxed{18}", "Half of 36 is 18.\n#### 18", True),
    ("\\boxed{36}", "Half of 36 is 18.\n#### 18", False),
    ("\\boxed{-2}", ["2", "-2"], True),
    ("\\boxed{3}", ["2", "-2"], False),
    ("\\boxed{\\pi}", "[\"\\\\pi\", \"180^\\\\circ\"]", True),
    ("\\boxed{2\\pi}", "[\"\\\\pi\", \"180^\\\\circ\"]", False),
]

# --- number formats ---------------------------------------------------------------------------------------
NUMBERS = [
    ("\\boxed{1\\,234\\,567}", "1234567", True),
    ("\\boxed{1\\,234\\,568}", "1234567", False),
    ("\\boxed{12\\!345}", "12345", True),
    ("\\boxed{1 234}", "1234", True),
    ("\\boxed{1\u2009234}", "1234", True),
    ("\\boxed{1\u2009235}", "1234", False),
    ("\\boxed{45 €}", "45", True),
    ("\\boxed{45€}", "46", False),
    ("\\boxed{12 m²}", "12", True),
    ("\\boxed{12 \\text{ m}^2}", "12", True),
    ("\\boxed{13 m²}", "12", False),
    ("\\boxed{25\\%}", "25", True),
    ("\\boxed{25\\%}", "25\\%", True),
    ("\\boxed{25}", "25\\%", True),
    ("\\boxed{26\\%}", "25\\%", False),
    ("\\boxed{\\$1,250}", "1250", True),
    ("\\boxed{\\$1,205}", "1250", False),
]

# --- matrices ------------------------------------------------------------------------------------------------
MATRICES = [
    ("\\boxed{\\begin{bmatrix} 1 & 0 \\\\ 0 & 1 \\end{bmatrix}}", "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", True),
    ("\\boxed{\\begin{bmatrix} 1 & 0 \\\\ 0 & -1 \\end{bmatrix}}", "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", False),
    ("\\boxed{\\left[\\begin{array}{cc} 2 & 3 \\\\ 5 & 7 \\end{array}\\right]}",
     "\\begin{pmatrix} 2 & 3 \\\\ 5 & 7 \\end{pmatrix}", True),
    ("\\boxed{\\left[\\begin{array}{cc} 2 & 3 \\\\ 7 & 5 \\end{array}\\right]}",
     "\\begin{pmatrix} 2 & 3 \\\\ 5 & 7 \\end{pmatrix}", False),
    ("\\boxed{\\begin{pmatrix}\n  \\frac{1}{2} & 0 \\\\\n  0 & 2\n\\end{pmatrix}}",
     "\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 2 \\end{pmatrix}", True),
    ("\\boxed{\\begin{pmatrix}\n  \\frac{1}{2} & 0 \\\\\n  0 & 3\n\\end{pmatrix}}",
     "\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 2 \\end{pmatrix}", False),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}", False),  # shape
    ("\\boxed{\\begin{pmatrix} 3 \\\\ -1 \\end{pmatrix}}", "\\begin{pmatrix} 3 \\\\ -1 \\end{pmatrix}", True),
]

# --- doubled backslashes from JSON on the gold side --------------------------------------------------------
JSON_ESCAPES = [
    ("\\boxed{\\frac{2}{3}}", "\\\\frac{2}{3}", True),
    ("\\boxed{\\frac{3}{2}}", "\\\\frac{2}{3}", False),
    ("\\boxed{2\\sqrt{2}}", "2\\\\sqrt{2}", True),
    ("\\boxed{2\\sqrt{3}}", "2\\\\sqrt{2}", False),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\\\begin{pmatrix} 1 \\\\\\\\ 2 \\\\end{pmatrix}", True),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}}", "\\\\begin{pmatrix} 1 \\\\\\\\ 2 \\\\end{pmatrix}", False),
    ("\\boxed{x \\ge 1}", "x \\\\geq 1", True),
    ("\\boxed{x \\le 1}", "x \\\\geq 1", False),
]

CATEGORIES = {
    "no_box": NO_BOX, "relations": RELATIONS, "labelled": LABELLED, "several_boxes": SEVERAL_BOXES,
    "gold_forms": GOLD_FORMS, "numbers": NUMBERS, "matrices": MATRICES, "json_escapes": JSON_ESCAPES,
}


def _cases():
    for name, rows in CATEGORIES.items():
        for i, (response, gold, expect) in enumerate(rows):
            yield pytest.param(response, gold, expect, id=f"{name}-{i}-{'right' if expect else 'wrong'}")


@pytest.mark.parametrize(("response", "gold", "expect"), list(_cases()))
def test_forms(response, gold, expect):
    g = grade(response, gold)
    assert g.correct is expect, g
