"""Answer extractors and code post-processors: pure functions of the completion text.

Every task reports its extractions through these functions, so the same text always gives
the same prediction, and a test can pin each rule on strings from the datasets themselves.

GSM8K (lm-evaluation-harness ``gsm8k`` / ``gsm8k_cot_zeroshot``, metadata version 3.0)
    ``strict``    first match of ``#### (\\-?[0-9\\.\\,]+)`` (the zero-shot CoT prompt's strict
                  rule is ``The answer is (\\-?[0-9\\.\\,]+).`` instead);
    ``flexible``  the *last* match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, first non-empty group;
    both stripped, ``[invalid]`` when nothing matches, then compared by exact match after
    deleting, in order, ``,`` / ``\\$`` / ``(?s).*#### `` / ``\\.$`` from prediction and
    reference and lower-casing both (``ignore_case: true``, ``ignore_punctuation: false``).
    The reference is the dataset's whole worked answer (the ``(?s).*#### `` rule reduces it).

MATH
    the content of the last ``\\boxed{...}`` (braces balanced; ``\\fbox`` too; ``\\boxed 5``
    without braces reads up to ``$`` or the end of the line), or Minerva's "Final Answer: The
    final answer is X. I hope it is correct." form, whichever comes last in the text.
    lm-eval's two ``minerva_math`` metrics (release 0.4.13, metadata 3.1) are reimplemented
    here too: ``exact_match`` (:func:`minerva_exact_match`: the Final Answer sentence and the
    gold's last box, both through the Minerva appendix-D normalisation :func:`minerva_normalize`)
    and ``math_verify`` (:func:`math_verify_whole`: the whole completion against the whole
    reference solution).

Stop strings
    :func:`cut_at_stops` cuts at the earliest occurrence of any stop string;
    :func:`split_at_stops` is lm-eval's own rule for generate_until (each stop string in turn,
    ``text.split(stop)[0]``), which differs only when one stop string overlaps another.

Code
    :func:`code_from_fences` takes the code out of a Markdown answer, :func:`sanitize_code`
    (the sanitiser ``SANITIZER``) keeps the longest parseable stretch and its definitions.
"""
from __future__ import annotations

import ast
import re
import warnings
from typing import Optional, Pattern, Sequence, Union

__all__ = [
    "INVALID", "GSM8K_STRICT", "GSM8K_COT_STRICT", "GSM8K_FLEXIBLE", "GSM8K_IGNORE",
    "regex_extract", "gsm8k_strict", "gsm8k_cot_strict", "gsm8k_flexible", "gsm8k_normalize",
    "gsm8k_match", "cut_at_stops", "split_at_stops", "last_boxed", "minerva_answer", "math_answer",
    "strip_dollars", "MINERVA_INVALID", "minerva_final_answer", "minerva_last_boxed", "minerva_unbox",
    "minerva_normalize", "minerva_gold", "minerva_is_equiv", "minerva_exact_match", "math_verify_whole",
    "SANITIZER", "code_from_fences", "sanitize_code", "fence_cut",
]

INVALID = "[invalid]"  # lm-eval's RegexFilter fallback
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_COT_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# exact_match's regexes_to_ignore, applied in this order to prediction and reference
GSM8K_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def regex_extract(text: str, pattern: Union[str, Pattern], group_select: int = 0,
                  fallback: str = INVALID) -> str:
    """lm-eval's ``regex`` filter: the ``group_select``-th match of ``pattern`` (0 = first,
    -1 = last); with several groups, the first non-empty one; stripped; ``fallback`` if none."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [g for g in match if g]
        if not groups:
            return fallback
        match = groups[0]
    return match.strip()


def gsm8k_strict(text: str) -> str:
    """The number after the first ``#### `` (lm-eval ``strict-match``)."""
    return regex_extract(text, GSM8K_STRICT)


def gsm8k_cot_strict(text: str) -> str:
    """The number after the first "The answer is " (``gsm8k_cot_zeroshot`` ``strict-match``)."""
    return regex_extract(text, GSM8K_COT_STRICT)


def gsm8k_flexible(text: str) -> str:
    """The last number-like run in the text (lm-eval ``flexible-extract``)."""
    return regex_extract(text, GSM8K_FLEXIBLE, group_select=-1)


def gsm8k_normalize(text: str) -> str:
    for rx in GSM8K_IGNORE:
        text = rx.sub("", text)
    return text.lower()


def gsm8k_match(prediction: str, reference: str) -> bool:
    """lm-eval's ``exact_match`` for gsm8k (``reference``: the full worked answer or the number)."""
    return gsm8k_normalize(prediction) == gsm8k_normalize(reference)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (the ``until`` convention)."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def split_at_stops(text: str, stops: Sequence[str]) -> str:
    """lm-eval's post-generation cut (HF models' ``generate_until``): for each non-empty stop
    string in order, keep what precedes its first occurrence."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


# ----------------------------------------------------------------------------------------- MATH

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_MINERVA = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")
_MINERVA_END = "I hope it is correct."


def _boxed_at(text: str, start: int) -> tuple[Optional[str], int]:
    """(content, position) of the box command whose match ends at ``start``."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1: j], start
        return None, start  # unbalanced: the answer was cut off
    if i > start:  # "\boxed 5$": up to the closing $ or the end of the line
        m = re.match(r"[^$\n]*", text[i:])
        content = m.group(0).strip()
        return (content or None), start
    return None, start


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (``None`` if absent or unbalanced)."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    return _boxed_at(text, matches[-1].end())[0]


def minerva_answer(text: str) -> Optional[str]:
    """X of "Final Answer: The final answer is X. I hope it is correct." (first occurrence; as
    lm-eval's ``get_unnormalized_answer``, the closing sentence may be missing at the very end)."""
    m = _MINERVA.search(text + _MINERVA_END)
    return m.group(1).strip() if m else None


def strip_dollars(answer: str) -> str:
    """``$x$`` -> ``x`` (one pair of enclosing dollar signs, as Minerva answers are written)."""
    a = answer.strip()
    while len(a) >= 2 and a.startswith("$") and a.endswith("$"):
        a = a[1:-1].strip()
    return a


def math_answer(text: str) -> Optional[str]:
    """The final answer of a MATH solution: last ``\\boxed{}`` or Minerva's final-answer
    sentence, whichever occurs later; ``None`` if the text has neither."""
    boxed_pos, boxed = -1, None
    matches = list(_BOXED.finditer(text))
    if matches:
        boxed, _ = _boxed_at(text, matches[-1].end())
        boxed_pos = matches[-1].start() if boxed is not None else -1
    m = _MINERVA.search(text + _MINERVA_END)
    if m and m.start() > boxed_pos:
        return strip_dollars(m.group(1).strip())
    return boxed


# ------------------------------------------------------------------- MATH: lm-eval's minerva metrics

MINERVA_INVALID = "[invalidanswer]"  # lm-eval's value when the Final Answer sentence is missing
# Minerva's answer normalisation (Lewkowycz et al. 2022, appendix D) as lm-eval 0.4.13 runs it:
# literal substitutions, then words and marks removed (alphabetic ones as whole words first)
_MINERVA_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
    "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
)
_LATEX_COMMAND = re.compile(r"(\\[a-zA-Z]+)")
# (pattern, replacement) applied in order after the removals
_MINERVA_REWRITES = (
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), r"$\3$"),  # the first $...$ span
    (re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),
    (re.compile(r"(frac)([^{])(.)"), r"frac{\2}{\3}"),  # \fracab -> \frac{a}{b}
    (re.compile(r"(sqrt)(\[[^\]]*\])(\w)"), r"\1\2{\3}"),  # \sqrt[3]a -> \sqrt[3]{a}
    (re.compile(r"(sqrt)(?!\[)([^{])"), r"sqrt{\2}"),  # \sqrta -> \sqrt{a}
)
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+")


def minerva_final_answer(text: str) -> str:
    """X of the first "Final Answer: The final answer is X. I hope it is correct." (the closing
    sentence may be cut off at the very end), stripped; :data:`MINERVA_INVALID` without one."""
    got = minerva_answer(text)
    return MINERVA_INVALID if got is None else got


def minerva_last_boxed(text: str) -> Optional[str]:
    """The last box of a solution *with* its command, as lm-eval's Minerva utilities find it: a
    ``\\boxed `` (with a space) anywhere wins and runs to the next ``$``; otherwise the last
    ``\\boxed`` (else ``\\fbox``) up to its balancing ``}``; None if absent or unbalanced."""
    spaced = "\\boxed "
    if spaced in text:
        return spaced + text.split(spaced)[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start: j + 1]
    return None


def minerva_unbox(boxed: Optional[str]) -> Optional[str]:
    """``\\boxed{x}`` / ``\\boxed x`` -> ``x``; None for anything else (lm-eval asserts there)."""
    if boxed is None:
        return None
    if "\\boxed " in boxed:
        return boxed[len("\\boxed "):] if boxed.startswith("\\boxed ") else None
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{"):-1]
    return None


def minerva_normalize(answer: str) -> str:
    """Minerva's final-answer normalisation (appendix D), as lm-eval 0.4.13 applies it."""
    s = answer.split("=")[-1]
    words = [w for w in _MINERVA_REMOVED if w.isalpha()]
    for w in words:  # unit words while whitespace still delimits them (never inside a command)
        s = re.sub(rf"(?<!\\)\b{w}\b", "", s)
    for old, new in _MINERVA_SUBSTITUTIONS:
        s = s.replace(old, new)
    for w in _MINERVA_REMOVED:
        if w.isalpha():  # glued to their neighbours once spaces are gone; command names are kept
            parts = _LATEX_COMMAND.split(s)
            s = "".join(p if i % 2 else p.replace(w, "") for i, p in enumerate(parts))
        else:
            s = s.replace(w, "")
    for rx, repl in _MINERVA_REWRITES:
        s = rx.sub(repl, s)
    s = s.replace("$", "")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def minerva_gold(solution: str) -> Optional[str]:
    """lm-eval's gold answer of a MATH solution: its last box, unboxed and normalised (None
    where the solution has no usable box)."""
    inner = minerva_unbox(minerva_last_boxed(solution))
    return None if inner is None else minerva_normalize(inner)


def _with_alarm(seconds: int, fn):
    """``fn()`` under a SIGALRM timer in the main thread (elsewhere without one); TimeoutError."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return fn()

    def on_alarm(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def minerva_is_equiv(a: str, b: str, timeout: int = 5) -> bool:
    """lm-eval's ``is_equiv`` of two normalised answers: equal non-empty strings, else the
    difference of the two parsed expressions simplifies to 0 (within ``timeout`` seconds).

    Deviation: lm-eval parses with sympy's ``parse_latex``, which needs antlr 4.11 and cannot
    be installed next to Hydra (antlr 4.9); this parses with math-verify's
    ``latex2sympy2_extended`` (antlr 4.9) instead.  Every unparsable or failing pair is False,
    as in lm-eval."""
    if isinstance(a, str) and a and a == b:
        return True
    try:
        import sympy
        from latex2sympy2_extended import latex2sympy

        def compare() -> bool:
            diff = latex2sympy(a) - latex2sympy(b)
            return bool(sympy.simplify(diff) == 0)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _with_alarm(timeout, compare)
    except Exception:  # noqa: BLE001 - parse errors, type errors, timeouts: not equivalent
        return False


def minerva_exact_match(completion: str, gold: Optional[str]) -> bool:
    """lm-eval ``minerva_math`` ``exact_match``: the normalised Final Answer of ``completion``
    is equivalent to ``gold`` (:func:`minerva_gold` of the reference solution)."""
    if gold is None:
        return False
    return minerva_is_equiv(minerva_normalize(minerva_final_answer(completion)), gold)


def math_verify_whole(completion: str, solution: str) -> bool:
    """lm-eval ``minerva_math`` ``math_verify``: math-verify's ``verify`` of the whole
    completion against the whole reference solution, both parsed with the default settings."""
    from math_verify import parse, verify

    try:
        return bool(verify(gold=parse(solution), target=parse(completion)))
    except Exception:  # noqa: BLE001 - math-verify's own failures count as wrong
        return False


# ----------------------------------------------------------------------------------------- code

SANITIZER = "sanitize-v1"
_OPEN_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\r?\n")
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
         ast.AnnAssign)
_DEF_START = re.compile(r"(?:async\s+def|def|class|import|from)\b|@")


def fence_cut(text: str) -> str:
    """``text`` up to its first ```` ``` ```` (lm-eval ``humaneval_instruct``: the model closes
    the code block its answer prefix opened)."""
    end = text.find("```")
    return text if end < 0 else text[:end]


def code_from_fences(text: str, opened: bool = False) -> str:
    """The code of a Markdown answer.

    ``opened=False``: the body of the first fenced block (to the end of the text if the block is
    never closed); the text unchanged if it has no opening fence.  ``opened=True``: the prompt
    already opened a block (a ``gen_prefix`` ending in a fence), so the code runs up to the first
    ```` ``` ````; if the text instead starts with a new fence that names a language (the
    model re-opened a block), that block's body.
    """
    if opened:
        head = text.lstrip()
        if head.startswith("```"):
            m = _OPEN_FENCE.match(head)
            if m and m.group(1):
                return code_from_fences(head, opened=False)
            return ""  # the prefix's block was closed straight away
        end = text.find("```")
        return text if end < 0 else text[:end]
    m = _OPEN_FENCE.search(text)
    if not m:
        return text
    end = text.find("```", m.end())
    return text[m.end():] if end < 0 else text[m.end(): end]


_MAX_STARTS, _MAX_PARSES = 32, 400  # bounds for pathological (long, broken) generations


def _parse_prefix(lines: list[str], budget: list) -> tuple[Optional[ast.Module], int]:
    """The longest prefix of ``lines`` that parses (shrinking from the first syntax error)."""
    n = len(lines)
    while n > 0 and budget[0] > 0:
        budget[0] -= 1
        try:
            with warnings.catch_warnings():  # invalid escapes ("\d") warn, as at import time
                warnings.simplefilter("ignore")
                return ast.parse("\n".join(lines[:n])), n
        except SyntaxError as e:
            bad = e.lineno if isinstance(e.lineno, int) else n
            n = min(n - 1, max(bad - 1, 0))
        except (ValueError, RecursionError, MemoryError):  # NUL bytes, absurd nesting
            n -= 1
    return None, 0


def sanitize_code(text: str, entry_point: Optional[str] = None, opened: bool = False, fences: bool = True) -> str:
    """The sanitiser ``sanitize-v1``: generated text in, a runnable module of definitions out.

    1. Markdown: the code of the fenced block (:func:`code_from_fences`; ``fences=False`` when
       the caller already took it out, e.g. before prepending a prompt).
    2. Line endings to ``\\n``; then the longest stretch of lines that parses, trying the start
       of the text first and then each later line that starts a definition or an import (so
       leading prose is skipped) and cutting trailing prose or a truncated tail at the first
       syntax error.  The first stretch that defines ``entry_point`` (or, without one, any
       function or class) wins; if none does, the longest one.
    3. Keep only top-level imports, function and class definitions and assignments (with
       their decorators and original text, comments included); drop the rest: calls such as
       ``print(...)``, ``assert``\\ s the model wrote, ``if __name__ == "__main__":`` blocks.

    It never rewrites code (no reformatting, no renaming), so a reference solution comes out
    with the same statements it went in with.
    """
    code = code_from_fences(text, opened=opened) if fences else text
    code = code.replace("\r\n", "\n").replace("\r", "\n")
    lines = code.split("\n")
    starts = ([0] + [i for i, line in enumerate(lines) if i and _DEF_START.match(line)])[:_MAX_STARTS]
    best: tuple[int, Optional[ast.Module], int, int] = (-1, None, 0, 0)  # (size, tree, start, n)
    budget = [_MAX_PARSES]
    for s in starts:
        tree, n = _parse_prefix(lines[s:], budget)
        if tree is None:
            continue
        names = {node.name for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        if (entry_point in names) if entry_point else bool(names):
            best = (n, tree, s, n)
            break
        if n > best[0]:
            best = (n, tree, s, n)
    _, tree, s, n = best
    if tree is None:
        return ""
    lines = lines[s: s + n]
    kept = []
    for node in tree.body:
        if not isinstance(node, _KEEP):
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        kept.append("\n".join(lines[first - 1: node.end_lineno]))
    return "\n".join(kept) + ("\n" if kept else "")
