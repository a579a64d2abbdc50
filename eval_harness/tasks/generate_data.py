"""Regenerate the bundled data of the local lm-eval tasks (deterministic).

    python -m eval_harness.tasks.generate_data

Multiple choice (4 choices, at least 300 items each, so that a 0.05 accuracy change is more than one
standard error, about 0.029 at 300 items):

- cpt_arith_mc.jsonl: two-digit addition/subtraction (generated).
- cpt_shakespeare_next.jsonl: three lines of a play, which line comes next? (the true line and three
  lines of other scenes of similar length). From the bundled corpus cpt/demo_data/shakespeare.jsonl.gz.
- cpt_python_next.jsonl: four lines of Python source, which line comes next? From modules of this
  interpreter's standard library that the demo does not train on (it reads the sorted stdlib up to
  ``encodings/``; these modules come later): held-out Python.
- cpt_shakespeare_mc.jsonl, cpt_python_mc.jsonl: hand-written cloze facts (28 and 32), then generated
  cloze items up to 300: a line cut before one of its words (Shakespeare) or identifiers (Python),
  the true word against three words of the same corpus and about the same length.

Perplexity (loglikelihood_rolling):

- cpt_python_ppl.jsonl: top-level functions of a few CPython standard-library modules (PSF licence).
- cpt_shakespeare_ppl.jsonl: passages of the plays in cpt/demo_data/shakespeare.jsonl.gz (public domain).

The Shakespeare files depend only on the bundled corpus (the tests regenerate them byte for byte);
the Python files on the interpreter's standard library (committed from Python 3.11). The tasks measure
the demo's old (Shakespeare) and new (Python) domain: tag them upstream/downstream in a run config to
match your own run.
"""

from __future__ import annotations

import ast
import gzip
import importlib
import inspect
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

PYTHON_FACTS = [
    ("In Python, a function is defined with the keyword", "def", ["func", "function", "fn"]),
    ("In Python, a class is defined with the keyword", "class", ["struct", "type", "object"]),
    ("In Python, the value that means 'nothing' is", "None", ["null", "nil", "undefined"]),
    ("In Python, an exception is raised with the keyword", "raise", ["throw", "except", "error"]),
    ("In Python, a module is imported with the keyword", "import", ["include", "require", "using"]),
    ("In Python, the built-in that returns the length of a list is", "len", ["size", "count", "length"]),
    ("In Python, a for loop over the numbers 0 to 9 uses", "range(10)", ["loop(10)", "seq(10)", "times(10)"]),
    ("In Python, a generator produces a value with the keyword", "yield", ["emit", "give", "produce"]),
    ("In Python, the boolean constants are True and", "False", ["false", "No", "Off"]),
    ("In Python, the method that adds one item to the end of a list is", "append", ["push", "add", "insert_end"]),
    ("In Python, exceptions are caught with try and", "except", ["catch", "rescue", "handle"]),
    ("In Python, the first parameter of an instance method is usually called", "self", ["this", "me", "it"]),
    ("In Python, an anonymous function is written with the keyword", "lambda", ["fn", "func", "anon"]),
    ("In Python, the constructor method of a class is named", "__init__", ["__new_object__", "constructor", "__create__"]),
    ("In Python, a dictionary literal is written with", "curly braces", ["square brackets", "angle brackets", "parentheses"]),
    ("In Python, a comment starts with the character", "#", ["//", "--", ";"]),
    ("In Python, the operator for integer division is", "//", ["/", "%", "div"]),
    ("In Python, the operator for exponentiation is", "**", ["^", "pow", "exp"]),
    ("In Python, a block of code is delimited by", "indentation", ["curly braces", "begin and end", "semicolons"]),
    ("In Python, a function returns a value with the keyword", "return", ["give", "yield", "out"]),
    ("In Python, the built-in that prints text to standard output is", "print", ["echo", "puts", "write"]),
    ("In Python, an immutable sequence written with parentheses is a", "tuple", ["list", "set", "dict"]),
    ("In Python, the statement that does nothing is", "pass", ["skip", "noop", "nothing"]),
    ("In Python, a loop is left early with the keyword", "break", ["exit", "stop", "leave"]),
    ("In Python, the next iteration of a loop starts with the keyword", "continue", ["next", "skip", "again"]),
    ("In Python, the standard module for regular expressions is", "re", ["regex", "regexp", "pattern"]),
    ("In Python, the standard module for reading and writing JSON is", "json", ["yaml", "pickle", "csv"]),
    ("In Python, a file is opened with the built-in", "open", ["file", "fopen", "read"]),
    ("In Python, a context manager is used with the keyword", "with", ["using", "within", "scope"]),
    ("In Python, the type of the literal 3.5 is", "float", ["int", "double", "real"]),
    ("In Python, a string that is formatted inline starts with the prefix", "f", ["s", "r", "b"]),
    ("In Python, a condition that has several branches uses if, elif and", "else", ["otherwise", "default", "then"]),
]

SHAKESPEARE_FACTS = [
    ("To be, or not to be: that is the", "question", ["answer", "problem", "matter"]),
    ("Romeo, Romeo! wherefore art thou", "Romeo", ["Juliet", "Mercutio", "Tybalt"]),
    ("All the world's a", "stage", ["garden", "prison", "dream"]),
    ("Now is the winter of our", "discontent", ["content", "season", "sorrow"]),
    ("Friends, Romans, countrymen, lend me your", "ears", ["swords", "hands", "eyes"]),
    ("A horse! a horse! my kingdom for a", "horse", ["crown", "sword", "ship"]),
    ("Shall I compare thee to a summer's", "day", ["night", "rose", "sea"]),
    ("Double, double toil and", "trouble", ["bubble", "labour", "sorrow"]),
    ("The lady doth protest too", "much", ["little", "loud", "long"]),
    ("Something is rotten in the state of", "Denmark", ["England", "France", "Norway"]),
    ("If music be the food of love, play", "on", ["loud", "soft", "more"]),
    ("Parting is such sweet", "sorrow", ["pain", "joy", "music"]),
    ("Et tu, Brute? Then fall,", "Caesar", ["Rome", "Cassius", "Antony"]),
    ("The course of true love never did run", "smooth", ["fast", "dry", "cold"]),
    ("Out, damned spot! out, I", "say", ["pray", "cry", "beg"]),
    ("We are such stuff as dreams are made", "on", ["of", "in", "by"]),
    ("Brevity is the soul of", "wit", ["love", "truth", "art"]),
    ("Good night, good night! parting is such sweet sorrow, that I shall say good night till it be", "morrow", ["night", "dawn", "noon"]),
    ("Alas, poor Yorick! I knew him,", "Horatio", ["Hamlet", "Laertes", "Ophelia"]),
    ("What's in a name? That which we call a rose by any other name would smell as", "sweet", ["fair", "strong", "good"]),
    ("Hamlet is the Prince of", "Denmark", ["Verona", "Scotland", "Athens"]),
    ("Macbeth is a Scottish", "thane", ["bishop", "merchant", "sailor"]),
    ("Othello is the Moor of", "Venice", ["Verona", "Padua", "Milan"]),
    ("The Merchant of Venice who lends money to Antonio is", "Shylock", ["Bassanio", "Portia", "Gratiano"]),
    ("In A Midsummer Night's Dream, the king of the fairies is", "Oberon", ["Puck", "Theseus", "Lysander"]),
    ("King Lear has three daughters: Goneril, Regan and", "Cordelia", ["Desdemona", "Miranda", "Viola"]),
    ("The Tempest takes place on an", "island", ["mountain", "ship", "forest"]),
    ("Uneasy lies the head that wears a", "crown", ["hat", "helm", "wreath"]),
]

PYTHON_MODULES = ["textwrap", "heapq", "bisect", "fnmatch", "shlex", "colorsys", "statistics", "string",
                  "calendar", "glob", "base64", "random", "functools", "copy", "difflib"]


def mc_rows(facts, seed):
    rng = random.Random(seed)
    rows = []
    for question, answer, wrong in facts:
        choices = [answer, *wrong]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    return rows


def arith_rows(n=300, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice(["+", "-"])
        value = a + b if op == "+" else a - b
        wrong = set()
        while len(wrong) < 3:
            w = value + rng.choice([-11, -10, -2, -1, 1, 2, 9, 10, 11])
            if w != value:
                wrong.add(w)
        choices = [str(value), *map(str, sorted(wrong))]
        rng.shuffle(choices)
        rows.append({"question": f"{a} {op} {b} =", "choices": choices, "answer": choices.index(str(value))})
    return rows


def python_rows(limit=60):
    rows = []
    for name in PYTHON_MODULES:
        mod = importlib.import_module(name)
        src = inspect.getsource(mod)
        tree = ast.parse(src)
        lines = src.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                text = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if 5 <= text.count("\n") <= 30:
                    rows.append({"source": name, "text": text})
                    break
    # a second pass for more variety
    for name in PYTHON_MODULES:
        if len(rows) >= limit:
            break
        mod = importlib.import_module(name)
        src = inspect.getsource(mod)
        lines = src.splitlines()
        fns = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
        for node in fns[1:4]:
            text = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if 5 <= text.count("\n") <= 30:
                rows.append({"source": name, "text": text})
    return rows[:limit]


def shakespeare_rows(limit=40, chars=700):
    path = HERE.parents[1] / "cpt" / "demo_data" / "shakespeare.jsonl.gz"
    with gzip.open(path, "rt") as f:
        scenes = [json.loads(line) for line in f]
    step = max(1, len(scenes) // limit)
    rows = []
    for scene in scenes[step // 2::step][:limit]:
        text = scene["text"]
        start = text.find("\n\n", len(text) // 3)
        start = 0 if start < 0 else start + 2
        chunk = text[start:start + chars]
        chunk = chunk[: chunk.rfind("\n")] if "\n" in chunk else chunk
        rows.append({"source": scene["title"], "text": chunk.strip()})
    return rows


# ---------------------------------------------------------------- generated multiple choice from the corpora

N_MC = 300
PYTHON_HELDOUT_MODULES = ["fractions", "ftplib", "gettext", "heapq", "hmac", "imaplib", "ipaddress", "mailbox",
                          "netrc", "optparse", "pathlib", "pprint", "queue", "sched", "shlex", "shutil", "smtplib",
                          "statistics", "string", "tarfile", "textwrap", "threading", "tokenize", "trace", "uuid",
                          "wave", "weakref", "zipfile"]
DOCSTRING_QUOTES = ('"' * 3, "'" * 3)
SPEAKER = re.compile(r"^[A-Z][A-Z' ]+[.,]")  # "KING HENRY." a speaker's name, "ELIZABETH, Queen to..." a cast list


def shakespeare_lines() -> list[list[str]]:
    """Per scene of the bundled corpus, its verse/prose lines (speaker names and stage directions dropped)."""
    path = HERE.parents[1] / "cpt" / "demo_data" / "shakespeare.jsonl.gz"
    scenes = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            lines = [ln.strip() for ln in json.loads(line)["text"].splitlines()]
            scenes.append([ln for ln in lines if len(ln) >= 20 and not SPEAKER.match(ln) and "[" not in ln
                           and "]" not in ln and not ln.startswith(("SCENE", "ACT"))])
    return scenes


def python_lines() -> list[list[str]]:
    """Per held-out stdlib module, its code lines of 12+ characters (right-stripped; comments and lines
    opening a docstring dropped)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in PYTHON_HELDOUT_MODULES:
        lines = [ln.rstrip() for ln in (root / f"{name}.py").read_text(encoding="utf-8").splitlines()]
        files.append([ln for ln in lines if len(ln.strip()) >= 12 and not ln.strip().startswith(("#", *DOCSTRING_QUOTES))
                      and any(c.isalpha() for c in ln)])
    return files


def pick_others(rng: random.Random, pool: list[str], exclude: set[str] | list[str], k: int = 3) -> list[str] | None:
    """``k`` different items of ``pool`` not in ``exclude`` (seeded draws; None when 200 draws find too few)."""
    out: list[str] = []
    for _ in range(200):
        c = pool[rng.randrange(len(pool))]
        if c not in exclude and c not in out:
            out.append(c)
            if len(out) == k:
                return out
    return None


def next_line_rows(docs: list[list[str]], n: int, context: int, seed: int) -> list[dict]:
    """``n`` items: ``context`` consecutive lines of a document, the true next line and three lines of
    other documents of about the same length (never equal to the true one)."""
    rng = random.Random(seed)
    buckets: dict[int, set[str]] = {}
    for d, lines in enumerate(docs):
        for ln in lines:
            buckets.setdefault(len(ln) // 10, set()).add(ln)
    by_len = {k: sorted(v) for k, v in buckets.items()}
    usable = [d for d, lines in enumerate(docs) if len(lines) > context]
    rows, seen = [], set()
    while len(rows) < n:
        d = rng.choice(usable)
        lines = docs[d]
        i = rng.randrange(context, len(lines))
        answer = lines[i]
        if (d, i) in seen or answer in lines[i - context:i]:
            continue
        wrong = pick_others(rng, by_len[len(answer) // 10], set(lines))
        if wrong is None:
            continue
        seen.add((d, i))
        choices = [answer, *wrong]
        rng.shuffle(choices)
        rows.append({"context": "\n".join(lines[i - context:i]), "choices": choices, "answer": choices.index(answer)})
    return rows


def cloze_rows(docs: list[list[str]], n: int, word_pattern: str, seed: int, context: int = 1) -> list[dict]:
    """``n`` items: a line cut before one of its words (``word_pattern``), after ``context`` previous lines;
    the true word against three other words of the corpus of the same length +-1."""
    rng = random.Random(seed)
    word = re.compile(word_pattern)
    by_len: dict[int, list[str]] = {}
    for w in sorted({m.group(0) for lines in docs for ln in lines for m in word.finditer(ln)}):
        by_len.setdefault(len(w), []).append(w)
    usable = [d for d, lines in enumerate(docs) if len(lines) > context]
    rows, seen = [], set()
    while len(rows) < n:
        d = rng.choice(usable)
        lines = docs[d]
        i = rng.randrange(context, len(lines))
        matches = [m for m in word.finditer(lines[i]) if m.start() > 0]
        if not matches or (d, i) in seen:
            continue
        m = rng.choice(matches)
        answer = m.group(0)
        wrong = pick_others(rng, [w for k in (len(answer) - 1, len(answer), len(answer) + 1) for w in by_len.get(k, [])],
                            {answer})
        if wrong is None:
            continue
        seen.add((d, i))
        choices = [answer, *wrong]
        rng.shuffle(choices)
        prompt = "\n".join([*lines[i - context:i], lines[i][:m.start()].rstrip()])
        rows.append({"question": prompt, "choices": choices, "answer": choices.index(answer)})
    return rows


def all_rows() -> dict[str, list[dict]]:
    """Every bundled data file's rows, by file name."""
    shk, py = shakespeare_lines(), python_lines()
    shk_facts, py_facts = mc_rows(SHAKESPEARE_FACTS, 2), mc_rows(PYTHON_FACTS, 1)
    return {
        "cpt_arith_mc.jsonl": arith_rows(),
        "cpt_python_mc.jsonl": py_facts + cloze_rows(py, N_MC - len(py_facts), r"[A-Za-z_][A-Za-z0-9_]{3,}", seed=11),
        "cpt_shakespeare_mc.jsonl": shk_facts + cloze_rows(shk, N_MC - len(shk_facts), r"[A-Za-z]{5,}", seed=12),
        "cpt_shakespeare_next.jsonl": next_line_rows(shk, N_MC, context=3, seed=13),
        "cpt_python_next.jsonl": next_line_rows(py, N_MC, context=4, seed=14),
        "cpt_python_ppl.jsonl": python_rows(),
        "cpt_shakespeare_ppl.jsonl": shakespeare_rows(),
    }


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(name: str, rows: list[dict]) -> None:
    DATA.mkdir(exist_ok=True)
    (DATA / name).write_text(dumps(rows), encoding="utf-8")
    print(f"{name}: {len(rows)} rows")


def main():
    for name, rows in all_rows().items():
        write(name, rows)


if __name__ == "__main__":
    main()
