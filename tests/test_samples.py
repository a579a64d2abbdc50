"""Text samples at each held-out evaluation (``eval.samples``, cpt/samples.py): a run writes each prompt's greedy
continuation at every evaluation to samples.jsonl and its log; the last ones are what the exported model generates
with plain transformers (with eval.ema, also the EMA weights' and export-ema/'s); a resume writes exactly the
uninterrupted run's rows; the config's refusals."""

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


def test_with_eval_ema_the_ema_weights_continue_the_prompts_too(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """train.ema_decay + eval.ema: each evaluation's rows, then the EMA weights' rows ("weights": "ema", a log line
    `sample step N (EMA): ...`); at step 0 the EMA is the start weights (the same text), at the end it is export-ema/,
    whose greedy continuations they are; the dry run says so."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.cli import main

    out = tmp_path / "run"
    cfg = samples_config(tiny_cpt_data, tiny_base, out)
    cfg["train"]["ema_decay"] = 0.5
    cfg["eval"]["ema"] = True
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--dry-run"]) == 0
    assert "up to 12 new tokens each, also from the EMA weights (prompts checked)" in capsys.readouterr().out
    lines = run(cfg)
    rows = read_samples(out)
    assert [(r["step"], r.get("weights"), r["prompt"]) for r in rows] == [
        (s, w, p) for s in (0, 3, 6) for w in (None, "ema") for p in PROMPTS]
    live, ema = ([r for r in rows if r["step"] == s and r.get("weights") == w] for s, w in ((0, None), (0, "ema")))
    assert [r["completion"] for r in live] == [r["completion"] for r in ema]
    # later, other weights: other text (at step 3 here; greedy, deterministic)
    assert [r["completion"] for r in rows if r.get("weights")] != [r["completion"] for r in rows if not r.get("weights")]
    assert sum(line.startswith("sample step 6 (EMA): ") for line in lines) == 2, lines

    tok = AutoTokenizer.from_pretrained(out / "export-ema")
    models = {w: AutoModelForCausalLM.from_pretrained(out / d).eval() for w, d in ((None, "export"), ("ema", "export-ema"))}
    assert not torch.equal(models[None].lm_head.weight, models["ema"].lm_head.weight)
    for r in rows[-4:]:
        ids = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            gen = models[r.get("weights")].generate(**ids, max_new_tokens=12, do_sample=False,
                                                    pad_token_id=tok.eos_token_id)[0, ids["input_ids"].size(1):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        assert tok.decode(gen, skip_special_tokens=True) == r["completion"], r


def test_samples_without_a_held_out_set_or_prompts_are_one_config_error(tiny_cpt_data, tmp_path):
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["eval"]["samples"] = {"prompts": ["x"]}
    load_config(base=cfg)  # held-out sets: accepted
    with pytest.raises(ConfigError, match="eval.samples: text samples are written at each held-out evaluation"):
        load_config(base={**cfg, "data": {**cfg["data"], "heldout": []}})
    with pytest.raises(ConfigError, match="eval.samples.prompts"):
        load_config(base={**cfg, "eval": {**cfg["eval"], "samples": {"prompts": []}}})


def test_a_prompt_past_the_models_context_is_one_error_at_the_dry_run_and_the_start(tiny_cpt_data, tiny_base, tmp_path,
                                                                                    capsys):
    """A prompt plus max_new_tokens longer than the model's positions (its position embeddings run out, or RoPE
    extrapolates: an error or garbage at every evaluation) is one config error naming the prompt, from `cpt train
    --dry-run` and from the start of training, before any step; prompts that fit are listed in the dry-run's plan."""
    import yaml
    from transformers import AutoConfig

    from cpt.cli import main

    context = AutoConfig.from_pretrained(tiny_base).max_position_embeddings
    cfg = samples_config(tiny_cpt_data, tiny_base, tmp_path / "run")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "ok.yaml"), "--dry-run"]) == 0
    assert "text samples at each evaluation: 2 prompt(s), up to 12 new tokens each (prompts checked)" in capsys.readouterr().out

    cfg["eval"]["samples"]["max_new_tokens"] = context  # the second prompt's tokens + context > context
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "long.yaml"), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpt train: error: eval.samples.prompts[0]: 'def read_config(path):' is "), err
    assert f"max_new_tokens={context} that is past the model's context ({context} positions)" in err[0], err
    with pytest.raises(ConfigError, match=r"eval.samples.prompts\[0\]"):
        run(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sampled_samples_are_seeded_by_step_and_prompt_and_leave_trainings_random_state_alone():
    """eval.samples.temperature > 0: sampled continuations (top_p nucleus), the same for the same (seed, step, prompt)
    (so a resumed run writes the uninterrupted one's rows: the greedy test above), another at another step or seed,
    not the greedy text; the global random state (dropout, data order) is not touched."""
    import torch

    from conftest import tiny_llama, tiny_tokenizer
    from cpt.samples import SampleGenerator

    words = ["the cat sat on the mat", "a dog ran in the park", "def f(x): return x"] * 20
    tok = tiny_tokenizer(words, 300, specials=("<eos>",))
    model = tiny_llama(len(tok), hidden=32, max_position_embeddings=64, eos_token_id=tok.eos_token_id, training=False)
    prompts = ["the cat", "def f"]

    def texts(step, **kw):
        gen = SampleGenerator(prompts, 16, tok, None, 64, **kw)
        return [r["completion"] for r in gen.generate(model, step)]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    sampled = texts(3, temperature=1.0, top_p=0.95, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # forked: training's random state is untouched
    assert model.training is False
    assert texts(3, temperature=1.0, top_p=0.95, seed=7) == sampled  # reproducible
    assert texts(4, temperature=1.0, top_p=0.95, seed=7) != sampled  # another step
    assert texts(3, temperature=1.0, top_p=0.95, seed=8) != sampled  # another seed
    assert texts(3) != sampled and texts(3) == texts(4)  # greedy: no randomness (untrained model: near-uniform logits)
    assert sampled[0] != sampled[1]


def test_sampling_options_without_sampling_are_one_config_error(tiny_cpt_data, tmp_path):
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["eval"]["samples"] = {"prompts": ["x"], "temperature": 0.8, "top_p": 0.9, "seed": 3}
    assert load_config(base=cfg).eval.samples.temperature == 0.8
    cfg["eval"]["samples"] = {"prompts": ["x"], "top_p": 0.9}
    with pytest.raises(ConfigError, match=r"eval.samples.*top_p: set for greedy samples \(temperature 0\)"):
        load_config(base=cfg)
    cfg["eval"]["samples"] = {"prompts": ["x"], "temperature": -1}
    with pytest.raises(ConfigError, match="eval.samples.temperature"):
        load_config(base=cfg)
