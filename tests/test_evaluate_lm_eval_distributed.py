"""lm-eval hook under 2 CPU processes: DDP (data-parallel requests), DeepSpeed ZeRO-3 and FSDP2 (lock-step
replicated evaluation) give the single-process results (scores and standard errors, on a fixed document subset)
on every rank and do not hang."""

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
    from eval_harness.lm_eval_hook import run_lm_eval_detailed

    out, mode, tasks = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    words = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)] + ["def f(x):\\n    return x"] * 10
    tokenizer = tiny_tokenizer(words, 300, specials=("<|endoftext|>",), pad_token="<|endoftext|>")
    model = tiny_llama(len(tokenizer), hidden=64, intermediate=128, max_position_embeddings=128,
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
            model, _ = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        elif mode == "fsdp":  # FSDP2 prepares a model only together with its optimizer
            model, _ = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
            assert model.model.embed_tokens.weight.to_local().numel() < model.config.vocab_size * 64  # sharded
        else:
            model = acc.prepare(model)
    # as in the training loop: seeded document subsets, stderrs (a bootstrap for bits per byte, over the per-document
    # values that lm-eval gathers from the ranks)
    samples = {t: [1, 4, 6, 9, 12, 15, 17] for t in tasks}
    res, _ = run_lm_eval_detailed(model, tokenizer, tasks, samples=samples, batch_size=2, accelerator=acc,
                                  max_length=64, bootstrap_iters=20)
    rank = acc.process_index if acc else 0
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"n": acc.num_processes if acc else 1, "res": res}, f)
    if acc is not None:  # tear the process group down before exit (gloo threads alive at exit can abort), as cpt's
        # runs do (cpt/distributed.py retire_process_group): the group outlives the model that also holds it (DDP's
        # Reducer, FSDP2's mesh) and is destroyed after the model is collected, not during interpreter shutdown
        from cpt.distributed import release_retired_groups, retire_process_group
        acc.wait_for_everyone()
        retire_process_group()
        acc.end_training()
        del model, acc
        release_retired_groups()
    """
)


def run(tmp_path: Path, mode: str) -> list[dict]:
    script = tmp_path / "dist_lm_eval.py"
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
    assert r["res"]["lm_eval/cpt_arith_mc/acc"] * 7 == round(r["res"]["lm_eval/cpt_arith_mc/acc"] * 7)
    assert r["res"]["lm_eval/cpt_arith_mc/acc_stderr"] > 0 and r["res"]["lm_eval/cpt_python_ppl/bits_per_byte_stderr"] > 0
    return r["res"]


def check(results, single):
    assert len(results) == 2 and single
    for r in results:
        assert r["n"] == 2
        assert r["res"].keys() == single.keys()
        for k, v in single.items():
            assert r["res"][k] == pytest.approx(v, rel=1e-4), k


def test_ddp_data_parallel_equals_single_process(tmp_path, single):
    check(run(tmp_path, "ddp"), single)


def test_zero3_lock_step_equals_single_process(tmp_path, single):
    check(run(tmp_path, "zero3"), single)


def test_fsdp_lock_step_equals_single_process(tmp_path, single):
    """FSDP2 (weights sharded; on CPU/gloo via tests/fsdp_on_cpu.py): every rank runs the whole evaluation in
    lock-step on the sharded model and gets the single-process scores."""
    check(run(tmp_path, "fsdp"), single)
