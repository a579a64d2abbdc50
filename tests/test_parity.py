"""Numerical parity of `cpt train` with what an experienced user compares it against: a hand-written PyTorch loop
(plain AdamW, one big batch of the same rows) and transformers' Trainer, on the rows cpt's data path fed (read back
with CPTDataLoader), in fp32 on CPU from the same start weights. Per step: the loss, the gradient norm before
clipping, the learning rate, the per-source losses and the tokens; after the run: the weights. The measured
differences are in docs/training.md ("Parity with a reference loop and the transformers Trainer")."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_llama, tiny_run_config
from cpt.config import load_config
from cpt.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS, B, L = 6, 8, 64
MAX_LR, MIN_LR, WARMUP = 3e-3, 3e-4, 2
SCHEDULE = {"type": "cosine", "max_lr": MAX_LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "warmup_from": 0.0}


def schedule_lr(step: int) -> float:
    """The documented schedule (cpt/schedules.py), written out: step 0 takes one warmup increment, the last warmup
    step exactly max_lr, the last step exactly min_lr."""
    if step < WARMUP:
        return MAX_LR * (step + 1) / WARMUP
    x = (step - WARMUP + 1) / (STEPS - WARMUP)
    return MIN_LR + (MAX_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * x))


@pytest.fixture(scope="module")
def init_dir(tiny_cpt_data, tmp_path_factory):
    """Start weights with biases (attention_bias) and untied embeddings, saved with the demo's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_cpt_data / "tokenizer")
    d = tmp_path_factory.mktemp("parity_init")
    tiny_llama(len(tok), hidden=32, intermediate=64, layers=2, heads=4, bias=True, eos_token_id=tok.eos_token_id,
               max_position_embeddings=L).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run_config(tiny_cpt_data, init_dir, out: Path, *, micro: int = 4, optim: dict | None = None, **train) -> dict:
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False, "every": None}, checkpoint={"every": None},
                          optim={"weight_decay": 0.1, "grad_clip": 0.5, **(optim or {})})
    cfg["model"] = {"name_or_path": str(init_dir)}
    cfg["data"]["heldout"] = []
    cfg["train"].update(global_batch_size=B, micro_batch_size=micro, **train)
    cfg["stages"][0].update(steps=STEPS, schedule=SCHEDULE)
    return cfg


def cpt_train(cfg: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(one metrics record per step, the exported weights)."""
    from safetensors.torch import load_file

    from cpt.train import train

    train(load_config(base=cfg), echo=lambda *a, **k: None)
    out = Path(cfg["run"]["output_dir"])
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    return recs, load_file(out / "export" / "model.safetensors")


def fed_batches(cfg: dict) -> list[dict[str, torch.Tensor]]:
    """The global batches cpt trained on, read back through its own data path (one process: all rows in order)."""
    from transformers import AutoTokenizer

    from cpt.data.loader import CPTDataLoader

    rc = load_config(base=cfg)
    data = CPTDataLoader(rc.data, rc.stages, AutoTokenizer.from_pretrained(rc.model.name_or_path), B, rc.run.seed)
    return [data.batch(s) for s in range(STEPS)]


def reference(init_dir, batches, *, clip: float, weight_decay: float = 0.1, z_loss: float = 0.0,
              lr_mult: dict[str, float] | None = None, autocast: bool = False, micro: int = B,
              router_aux: float = 0.0, eos_id: int | None = None):
    """The hand-written loop: plain torch AdamW (betas 0.9/0.95, eps 1e-8), decay on every >=2-D weight that is not a
    norm (the Trainer's rule), one forward of all B rows per step (or ``micro`` rows at a time, each loss weighted by
    its share of the predicted positions), the loss the mean over every predicted position (+ z-loss),
    clip_grad_norm_; with ``eos_id`` (document masking) positions that restart after every EOS. Returns per-step (loss, grad norm, per-source losses, z term) and the final weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32).train()
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        mult = math.prod(m for pat, m in (lr_mult or {}).items() if pat in n)
        groups.setdefault((p.ndim >= 2 and "norm" not in n, mult), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": weight_decay if decay else 0.0, "mult": mult}
                             for (decay, mult), ps in groups.items()], lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    steps = []
    for s, batch in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = schedule_lr(s) * g["mult"]
        losses, z_terms = [], []
        for ids in batch["input_ids"].split(micro):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                kw = {"output_router_logits": True} if router_aux else {}
                if eos_id is not None:
                    kw["position_ids"] = restarting_positions(ids, eos_id)
                out = model(input_ids=ids, use_cache=False, **kw)
            logits = out.logits[:, :-1].float()
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total = per_token.mean() + z_loss * torch.logsumexp(logits, -1).square().mean() if z_loss else per_token.mean()
            if router_aux:  # a mixture of experts' load-balancing loss, of this micro-batch
                total = total + router_aux * out.aux_loss
            (total * per_token.numel() / (B * (L - 1))).backward()
            losses.append(per_token.detach())
            z_terms.append((total - per_token.mean()).item() if z_loss else 0.0 * per_token.numel() / (B * (L - 1)))
        per_token = torch.cat(losses)
        loss = per_token.mean()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        rows = per_token.mean(1)
        by_source = {int(k): rows[batch["source"] == k].mean().item() for k in batch["source"].unique()}
        steps.append((loss.item(), grad_norm.item(), by_source, sum(z_terms)))
    return steps, model.state_dict()


def restarting_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions counting from 0 at each row's start and again after every EOS, written out row by row."""
    out = torch.zeros_like(ids)
    for r, row in enumerate(ids.tolist()):
        pos = 0
        for i, token in enumerate(row):
            out[r, i] = pos
            pos = 0 if token == eos_id else pos + 1
    return out


def max_diffs(recs: list[dict], ref_steps, exported, ref_weights, names=("python", "shakespeare")) -> dict[str, float]:
    per_source = [abs(r[f"train/loss/{names[k]}"] - v) for r, ref in zip(recs, ref_steps) for k, v in ref[2].items()]
    return {
        "loss": max(abs(r["train/loss"] - ref[0]) for r, ref in zip(recs, ref_steps)),
        "grad_norm": max(abs(r["train/grad_norm"] - ref[1]) for r, ref in zip(recs, ref_steps)),
        "source_loss": max(per_source),
        "weights": max((exported[k] - ref_weights[k]).abs().max().item() for k in ref_weights),
    }


@pytest.fixture(scope="module")
def accumulated(tiny_cpt_data, init_dir, tmp_path_factory):
    """`cpt train`, 6 steps of 8 rows as 2 micro-batches of 4, clipping active (0.5), weight decay 0.1."""
    cfg = run_config(tiny_cpt_data, init_dir, tmp_path_factory.mktemp("parity") / "run")
    return (cfg, *cpt_train(cfg))


def test_cpt_train_matches_a_hand_written_loop(accumulated, init_dir):
    """Accumulated micro-batches = one big batch; clipping, decay groups, LR per step, logged losses, tokens."""
    cfg, recs, exported = accumulated
    batches = fed_batches(cfg)
    ref_steps, ref_weights = reference(init_dir, batches, clip=0.5)
    assert set(exported) == set(ref_weights)
    d = max_diffs(recs, ref_steps, exported, ref_weights)
    print("fp32 accumulation vs one batch:", d)
    assert d["loss"] < 2e-6 and d["grad_norm"] < 2e-6 and d["source_loss"] < 2e-6 and d["weights"] < 2e-5, d
    assert all(ref[1] > 0.5 for ref in ref_steps)  # clipping was active at every step
    # the LR of every step is the documented one: step 0 one warmup increment, the last step exactly min_lr
    assert [r["train/lr"] for r in recs] == pytest.approx([schedule_lr(s) for s in range(STEPS)], rel=1e-12)
    assert recs[0]["train/lr"] == MAX_LR / WARMUP and recs[WARMUP - 1]["train/lr"] == MAX_LR
    assert recs[-1]["train/lr"] == pytest.approx(MIN_LR, rel=1e-12)
    # train/tokens counts every input position of every row (no padding in packed rows; EOS separators included)
    assert [r["train/tokens"] for r in recs] == [B * L * (s + 1) for s in range(STEPS)]
    assert all(b["input_ids"].shape == (B, L) for b in batches)


def test_document_masking_matches_the_reference(tiny_cpt_data, init_dir, tmp_path):
    """data.document_masking: every packed document attends to itself only (positions restart after each EOS, every
    position still a label): the reference with those positions, as transformers computes packed sequences."""
    from transformers import AutoTokenizer

    cfg = run_config(tiny_cpt_data, init_dir, tmp_path / "run")
    cfg["data"]["document_masking"] = True
    recs, exported = cpt_train(cfg)
    batches = fed_batches(cfg)
    eos = AutoTokenizer.from_pretrained(init_dir).eos_token_id
    assert any(bool((b["input_ids"][:, :-1] == eos).any()) for b in batches)  # a document ends inside a row
    ref_steps, ref_weights = reference(init_dir, batches, clip=0.5, eos_id=eos)
    d = max_diffs(recs, ref_steps, exported, ref_weights)
    print("fp32 document masking:", d)
    assert d["loss"] < 2e-6 and d["grad_norm"] < 2e-6 and d["source_loss"] < 2e-6 and d["weights"] < 2e-5, d
    unmasked, _ = reference(init_dir, batches, clip=0.5)
    assert max(abs(u[0] - r["train/loss"]) for u, r in zip(unmasked, recs)) > 1e-4  # (the masking changes the numbers)


def test_transformers_trainer_takes_the_same_steps(accumulated, init_dir):
    """transformers.Trainer on the same rows in the same order (sequential sampler, 2 x 4 accumulated), cpt's LR
    per step through a LambdaLR: the same losses, grad norms and weights. Its decay groups are cpt's."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from cpt.optim import param_groups

    cfg, recs, exported = accumulated
    rows = torch.cat([b["input_ids"] for b in fed_batches(cfg)])
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    seen = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs or {}, step=state.global_step))

    args = TrainingArguments(output_dir=str(Path(cfg["run"]["output_dir"]).parent / "hf"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=MAX_LR, weight_decay=0.1,
                             adam_beta2=0.95, max_grad_norm=0.5, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
                      callbacks=[Keep()])
    trainer.create_optimizer()
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: schedule_lr(s) / MAX_LR)
    ours = param_groups(AutoModelForCausalLM.from_pretrained(init_dir), 0.1)
    assert sorted(n for g in ours if g["weight_decay"] for n in g["param_names"]) == sorted(trainer.get_decay_parameter_names(model))
    trainer.train()
    logs = [x for x in seen if "loss" in x]
    assert [x["step"] for x in logs] == list(range(1, STEPS + 1))
    d = {"loss": max(abs(x["loss"] - r["train/loss"]) for x, r in zip(logs, recs)),
         "grad_norm": max(abs(x["grad_norm"] - r["train/grad_norm"]) for x, r in zip(logs, recs)),
         "lr": max(abs(x["learning_rate"] - r["train/lr"]) for x, r in zip(logs, recs)),
         "weights": max((exported[k] - v).abs().max().item() for k, v in model.state_dict().items())}
    print("fp32 transformers.Trainer vs cpt:", d)
    assert d["loss"] < 2e-6 and d["grad_norm"] < 2e-6 and d["lr"] < 1e-12 and d["weights"] < 2e-5, d


def test_z_loss_and_lr_multipliers_match_the_reference(tiny_cpt_data, init_dir, tmp_path):
    """z-loss over accumulated micro-batches = z-loss of the one big batch; lr_multipliers scale the group's LR (its
    decoupled weight decay with it, as torch's AdamW does)."""
    mult = {"embed_tokens": 0.1, "lm_head": 3.0}
    cfg = run_config(tiny_cpt_data, init_dir, tmp_path / "run", optim={"lr_multipliers": mult}, z_loss=1e-3)
    recs, exported = cpt_train(cfg)
    ref_steps, ref_weights = reference(init_dir, fed_batches(cfg), clip=0.5, z_loss=1e-3, lr_mult=mult)
    d = max_diffs(recs, ref_steps, exported, ref_weights)
    d["z_loss"] = max(abs(r["train/z_loss"] - ref[3]) for r, ref in zip(recs, ref_steps))  # the logged z term
    print("fp32 z-loss + lr multipliers:", d, "z term", ref_steps[0][3])
    assert d["loss"] < 2e-6 and d["grad_norm"] < 2e-6 and d["weights"] < 2e-5 and d["z_loss"] < 1e-6, d
    # logged every 3 steps: train/loss and train/z_loss are both the means over the 3 steps (z_loss was the 3rd's)
    cfg = run_config(tiny_cpt_data, init_dir, tmp_path / "every3", optim={"lr_multipliers": mult}, z_loss=1e-3, log_every=3)
    from cpt.train import train

    train(load_config(base=cfg), echo=lambda *a, **k: None)
    logged = [r for r in read_metrics(tmp_path / "every3" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:
        window = ref_steps[r["step"] - 3:r["step"]]
        assert r["train/loss"] == pytest.approx(sum(x[0] for x in window) / 3, abs=2e-6)
        assert r["train/z_loss"] == pytest.approx(sum(x[3] for x in window) / 3, abs=1e-6)
    # the z term is in the gradient (not only logged): without it the grad norms differ
    plain, _ = reference(init_dir, fed_batches(cfg)[:1], clip=0.5)
    assert abs(plain[0][1] - recs[0]["train/grad_norm"]) > 1e-4


def test_mixture_of_experts_router_loss_is_a_mean_over_micro_batches(tiny_cpt_data, tmp_path):
    """A Mixtral's router load-balancing loss enters each micro-batch's loss with its coefficient, the gradient
    accumulation dividing it like the next-token loss: the reference's micro-batch loop. train/loss stays the
    next-token loss; train/router_aux_loss is the mean load-balancing loss of the step's micro-batches.
    (transformers' Trainer, measured: under gradient_accumulation_steps k it adds the router term k times, to the
    gradient and to its logged loss, which includes the term; docs/training.md.)"""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_cpt_data / "tokenizer")
    config = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=len(tok), num_experts_per_tok=2, num_local_experts=4,
                                  router_aux_loss_coef=0.05, max_position_embeddings=L, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    cfg = run_config(tiny_cpt_data, tmp_path / "init", tmp_path / "run")
    recs, _ = cpt_train(cfg)
    batches = fed_batches(cfg)
    ref_steps, ref_weights = reference(tmp_path / "init", batches, clip=0.5, micro=4, router_aux=0.05)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").state_dict()  # (fused expert names)
    d = max_diffs(recs, ref_steps, exported, ref_weights)
    print("fp32 MoE router loss, 2 micro-batches:", d, "logged aux", recs[0]["train/router_aux_loss"])
    assert d["loss"] < 2e-6 and d["grad_norm"] < 2e-6 and d["source_loss"] < 2e-6 and d["weights"] < 2e-5, d
    assert 1.5 < recs[0]["train/router_aux_loss"] < 2.5  # (top-2 of 4 experts: about 2 when balanced)


def test_bf16_autocast_matches_autocast_in_the_reference(tiny_cpt_data, init_dir, tmp_path):
    """train.precision: bf16 is autocast over fp32 master weights: the reference under torch.autocast(bf16)."""
    from accelerate.state import AcceleratorState

    cfg = run_config(tiny_cpt_data, init_dir, tmp_path / "run", precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # (process-wide: an earlier test's precision)
    try:
        recs, exported = cpt_train(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # bf16 stays out of later tests
    assert all(v.dtype == torch.float32 for v in exported.values())  # fp32 master weights, exported as such
    batches = fed_batches(cfg)
    # the same micro-batch shapes as cpt (bf16 matmuls round differently on other shapes)
    ref_steps, ref_weights = reference(init_dir, batches, clip=0.5, autocast=True, micro=4)
    fp32_steps, fp32_weights = reference(init_dir, batches, clip=0.5)
    d = max_diffs(recs, ref_steps, exported, ref_weights)
    d["update"] = update_difference(exported, ref_weights, init_dir)
    noise = {"loss": max(abs(a[0] - b[0]) for a, b in zip(ref_steps, fp32_steps)),
             "grad_norm": max(abs(a[1] - b[1]) for a, b in zip(ref_steps, fp32_steps)),
             "update": update_difference(ref_weights, fp32_weights, init_dir)}
    print("bf16 autocast vs the bf16 reference:", d, "| bf16 reference vs fp32 reference:", noise)
    # step 0 (same start weights): the same numbers; later, one bf16 rounding of slightly different weights grows
    # into differences well inside what bf16 itself changes against fp32
    assert abs(recs[0]["train/loss"] - ref_steps[0][0]) < 2e-6 and abs(recs[0]["train/grad_norm"] - ref_steps[0][1]) < 2e-6
    assert all(d[k] < noise[k] / 1.5 for k in noise), (d, noise)
    assert d["update"] < 0.05, d


def update_difference(weights: dict, ref_weights: dict, init_dir: Path) -> float:
    """|| (weights - start) - (ref_weights - start) || / || ref_weights - start ||: how far the two runs' updates differ."""
    from safetensors.torch import load_file

    start = load_file(Path(init_dir) / "model.safetensors")
    diff = sum((weights[k] - ref_weights[k]).double().square().sum() for k in ref_weights)
    moved = sum((ref_weights[k] - start[k]).double().square().sum() for k in ref_weights)
    return float((diff / moved).sqrt())


@pytest.mark.parametrize("mode,clip", [("ddp", 0.5), ("zero3", None), ("fsdp_cpu", None)])
def test_two_processes_match_one_big_batch(tiny_cpt_data, init_dir, tmp_path, mode, clip):
    """2 ranks x 2 micro-batches of 2 rows: the all-reduced (DDP) or reduce-scattered (ZeRO-3, FSDP2) accumulated
    gradient is the one big batch's. Without clipping (optim.grad_clip: null) ZeRO-3 logged train/grad_norm 0.0 every
    step (the sum over p.grad after DeepSpeed had stepped inside backward) and FSDP2 stopped at the first step (a
    DTensor gradient added to a plain tensor); both now take the norm through accelerate, as with clipping."""
    from safetensors.torch import load_file

    from launching import FREE_PORT, ROOT, VENV_BIN, accelerate_launch, rank_env

    cfg = run_config(tiny_cpt_data, init_dir, tmp_path / "run", micro=2, optim={"grad_clip": clip})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if mode == "fsdp_cpu":  # the shipped FSDP2 config, on CPU/gloo through accelerate's real FSDP branch
        prefix = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  *FREE_PORT]
        env = rank_env(cpu=True, fsdp_on_cpu=True)
    else:
        prefix, env = accelerate_launch(mode)
    proc = subprocess.run([*prefix, "-m", "cpt.cli", "train", str(path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = Path(cfg["run"]["output_dir"])
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert {round(r["perf/tokens_per_s"] / r["perf/tokens_per_s_per_device"]) for r in recs} == {2}
    ref_steps, ref_weights = reference(init_dir, fed_batches(cfg), clip=clip or math.inf)
    d = max_diffs(recs, ref_steps, load_file(out / "export" / "model.safetensors"), ref_weights)
    print(f"fp32 2-process {mode} vs one batch:", d)
    assert d["loss"] < 2e-6 and d["grad_norm"] < 2e-6 and d["source_loss"] < 2e-6 and d["weights"] < 2e-5, d
    assert [r["train/tokens"] for r in recs] == [B * L * (s + 1) for s in range(STEPS)]
