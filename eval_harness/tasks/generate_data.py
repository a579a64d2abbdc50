"""Regenerate the bundled data of the local lm-eval tasks (deterministic).

    python -m eval_harness.tasks.generate_data

- cpt_arith_mc.jsonl: two-digit addition/subtraction, 4 choices (generated).
- cpt_python_mc.jsonl, cpt_shakespeare_mc.jsonl: hand-written cloze facts, 4 choices.
- cpt_python_ppl.jsonl: top-level functions of a few CPython standard-library modules (PSF licence),
  taken from the running interpreter.
- cpt_shakespeare_ppl.jsonl: passages of the plays in cpt/demo_data/shakespeare.jsonl.gz (public domain).
The two perplexity sets overlap the demo's corpora on purpose: they measure knowledge of the old
(Shakespeare) and the new (Python) domain, next to the multiple-choice accuracies.
"""

from __future__ import annotations

import ast
import gzip
import importlib
import inspect
import json
import random
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


def arith_rows(n=100, seed=0):
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


def write(name, rows):
    DATA.mkdir(exist_ok=True)
    with open(DATA / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} rows")


def main():
    write("cpt_arith_mc.jsonl", arith_rows())
    write("cpt_python_mc.jsonl", mc_rows(PYTHON_FACTS, 1))
    write("cpt_shakespeare_mc.jsonl", mc_rows(SHAKESPEARE_FACTS, 2))
    write("cpt_python_ppl.jsonl", python_rows())
    write("cpt_shakespeare_ppl.jsonl", shakespeare_rows())


if __name__ == "__main__":
    main()
