"""Evaluation over 2 CPU processes equals single-process evaluation, under DDP, FSDP2 (on CPU) and DeepSpeed ZeRO-3,
in one launch each:

* held-out losses (`heldout_loss`, `HeldoutEvaluator`), with an uneven split (7 rows over 2 ranks) so the dummy-batch
  padding is exercised;
* the lm-eval hook: DDP evaluates data-parallel requests, ZeRO-3 and FSDP2 the whole evaluation in lock-step on the
  sharded model; every rank gets the single-process scores and standard errors (on a fixed document subset) and
  nothing hangs.

The reference is the same script run as one plain process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launching import accelerate_launch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["cpt_arith_mc", "cpt_python_ppl"]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from conftest import tiny_llama, tiny_tokenizer
    from cpt.config import EvalConfig
    from cpt.evaluate import HeldoutEvaluator, HeldoutSet, heldout_loss
    from eval_harness.lm_eval_hook import run_lm_eval_detailed

    out, mode, tasks = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    words = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)] + ["def f(x):\\n    return x"] * 10
    tokenizer = tiny_tokenizer(words, 300, specials=("<|endoftext|>",), pad_token="<|endoftext|>")
    vocab = len(tokenizer)
    model = tiny_llama(vocab, hidden=64, intermediate=128, max_position_embeddings=128,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    acc = None
    if mode == "fsdp":
        from fsdp_on_cpu import force_fsdp_on_cpu
        force_fsdp_on_cpu()
    if mode != "single":
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs
        acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        if mode == "zero3":
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
            model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
            # really sharded: this rank holds only part of the embedding
            assert model.module.model.embed_tokens.weight.ds_tensor.numel() < vocab * 64
        elif mode == "fsdp":  # FSDP2 prepares a model only together with its optimizer
            model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
            assert model.model.embed_tokens.weight.to_local().numel() < vocab * 64  # FSDP2 DTensor: this rank's shard
        else:
            model = acc.prepare(model)

    # held-out losses: 7 rows over 2 ranks (4 + 3)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, vocab, (7, 16), generator=g)
    toks2 = torch.randint(0, vocab, (3, 16), generator=g)
    loss = heldout_loss(model, toks, batch_size=2, accelerator=acc)
    ev = HeldoutEvaluator([HeldoutSet("old", "upstream", toks), HeldoutSet("new", "downstream", toks2)],
                          EvalConfig(batch_size=2), acc)
    metrics = ev.evaluate(model, step=0)

    # lm-eval as in the training loop: seeded document subsets, stderrs (a bootstrap for bits per byte, over the
    # per-document values that lm-eval gathers from the ranks)
    samples = {t: [1, 4, 6, 9, 12, 15, 17] for t in tasks}
    res, _ = run_lm_eval_detailed(model, tokenizer, tasks, samples=samples, batch_size=2, accelerator=acc,
                                  max_length=64, bootstrap_iters=20)
    rank = acc.process_index if acc else 0
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"n": acc.num_processes if acc else 1, "distributed_type": str(acc.distributed_type) if acc else "",
                   "loss": loss, "metrics": metrics, "lm_eval": res}, f)
    if acc is not None:  # tear the process group down before exit (gloo threads alive at exit can abort: "terminate
        # called without an active exception", seen once in CI under load), as cpt's runs do (cpt/distributed.py
        # retire_process_group): the group outlives the model that also holds it (DDP's Reducer, FSDP2's mesh,
        # ZeRO-3's and FSDP2's optimizer parameters) and is destroyed after the model is collected
        from cpt.distributed import release_retired_groups, retire_process_group
        acc.wait_for_everyone()
        retire_process_group()
        acc.end_training()
        del model, ev, acc
        opt = None
        release_retired_groups()
    """
)


def run(tmp_path: Path, mode: str) -> list[dict]:
    script = tmp_path / "dist_eval.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"res_{mode}"
    if mode == "single":
        args, env = [sys.executable, str(script)], dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    else:
        args, env = accelerate_launch(mode)
        args = args + [str(script)]
    proc = subprocess.run(args + [str(out), mode, ",".join(TASKS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    n = 1 if mode == "single" else 2
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    (r,) = run(tmp_path_factory.mktemp("single"), "single")
    assert r["metrics"] and r["loss"] > 0
    res = r["lm_eval"]
    assert res["lm_eval/cpt_arith_mc/acc"] * 7 == round(res["lm_eval/cpt_arith_mc/acc"] * 7)
    assert res["lm_eval/cpt_arith_mc/acc_stderr"] > 0 and res["lm_eval/cpt_python_ppl/bits_per_byte_stderr"] > 0
    return r


def check(results: list[dict], single: dict, kind: str) -> None:
    assert len(results) == 2
    for r in results:
        assert r["n"] == 2, r  # really two synchronised processes
        assert kind in r["distributed_type"], r["distributed_type"]
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert r["metrics"].keys() == single["metrics"].keys()
        for k, v in single["metrics"].items():
            assert r["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert r["lm_eval"].keys() == single["lm_eval"].keys()
        for k, v in single["lm_eval"].items():
            assert r["lm_eval"][k] == pytest.approx(v, rel=1e-4), k
    assert results[0]["loss"] == results[1]["loss"]  # both ranks report the same reduced value


def test_ddp_two_processes_equal_single_process(tmp_path, single):
    """DDP: held-out rows and lm-eval requests split over the ranks."""
    check(run(tmp_path, "ddp"), single, "MULTI_CPU")


def test_zero3_two_processes_equal_single_process(tmp_path, single):
    """ZeRO-3 (partitioned weights): every rank runs the forwards in step, the uneven tail included."""
    check(run(tmp_path, "zero3"), single, "DEEPSPEED")


def test_fsdp_two_processes_equal_single_process(tmp_path, single):
    """FSDP2 (sharded DTensor weights, on CPU/gloo via tests/fsdp_on_cpu.py): every rank runs the forwards in step,
    the uneven tail included, and the whole lm-eval evaluation in lock-step."""
    check(run(tmp_path, "fsdp"), single, "FSDP")
