"""Text samples at each held-out evaluation (``eval.samples``, cpt/samples.py): a run writes each prompt's greedy
continuation at every evaluation to samples.jsonl and its log; the last ones are what the exported model generates
with plain transformers; a resume writes exactly the uninterrupted run's rows; the config's refusals."""

import shutil

import pytest

from conftest import tiny_run_config
from cpt.config import ConfigError, load_config
from cpt.samples import read_samples

PROMPTS = ["def read_config(path):", "ROMEO:"]


def run(cfg: dict, **kw) -> list[str]:
    from cpt.train import train

    lines: list[str] = []
    train(load_config(base=cfg), echo=lambda *a, **k: lines.append(" ".join(map(str, a))), **kw)
    return lines


def samples_config(tiny_cpt_data, tiny_base, out) -> dict:
    """6 steps from the tiny base, evaluated at 0, 3 and 6 (a checkpoint at 3), two prompts of up to 12 new tokens."""
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"every": 3, "dense_steps": 0, "at_start": True},
                          checkpoint={"every": 3, "keep": 5})
    cfg["model"].update(name_or_path=str(tiny_base), arch=None, tokenizer=None)
    cfg["stages"][0]["steps"] = 6
    cfg["eval"]["samples"] = {"prompts": PROMPTS, "max_new_tokens": 12}
    return cfg


def test_a_run_writes_its_samples_the_export_generates_them_and_a_resume_writes_the_same(tiny_cpt_data, tiny_base,
                                                                                      tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "a"
    cfg = samples_config(tiny_cpt_data, tiny_base, out)
    lines = run(cfg)
    rows = read_samples(out)
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 3, 6) for p in PROMPTS]
    assert all(0 < r["new_tokens"] <= 12 and r["completion"] for r in rows)
    assert {r["completion"] for r in rows if r["step"] == 0} != {r["completion"] for r in rows if r["step"] == 6}
    assert sum(line.startswith("sample step ") for line in lines) == 6, lines
    assert f"sample step 6: {PROMPTS[1]!r} -> " in "\n".join(lines)

    # the last samples are the exported model's greedy continuations in plain transformers
    tok = AutoTokenizer.from_pretrained(out / "export")
    model = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    for r in rows[-2:]:
        ids = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids["input_ids"].size(1):]
        gen = gen.tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        assert tok.decode(gen, skip_special_tokens=True) == r["completion"]

    # killed after the step-3 checkpoint (its step-6 rows written, then lost with the kill's checkpoint): resumed
    again = tmp_path / "b"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_00000006")
    shutil.rmtree(again / "export")
    run({**cfg, "run": {**cfg["run"], "output_dir": str(again)}}, resume=True)
    assert read_samples(again) == rows


def test_samples_without_a_held_out_set_or_prompts_are_one_config_error(tiny_cpt_data, tmp_path):
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["eval"]["samples"] = {"prompts": ["x"]}
    load_config(base=cfg)  # held-out sets: accepted
    with pytest.raises(ConfigError, match="eval.samples: text samples are written at each held-out evaluation"):
        load_config(base={**cfg, "data": {**cfg["data"], "heldout": []}})
    with pytest.raises(ConfigError, match="eval.samples.prompts"):
        load_config(base={**cfg, "eval": {**cfg["eval"], "samples": {"prompts": []}}})
