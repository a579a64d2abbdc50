"""DoRA + LoRA+ on 2 processes (`scripts/launch.sh run.yaml ddp|fsdp|zero3`, as tests/test_lora_sharded_checkpoints.py
launches plain LoRA): DoRA's magnitude vectors are parameters of their own that FSDP2 and ZeRO-3 shard (and DDP
all-reduces), and LoRA+'s groups go through accelerate's optimizer wrapper and the backends' sharded Adam state.

* the 2-process run (DDP, FSDP2, ZeRO-3) gives the 1-process run's losses and held-out losses, and its adapter export
  (gathered at its end) loads in peft and reproduces the logged held-out loss;
* FSDP2: its step-3 checkpoint holds the magnitudes (DCP shards) and their Adam state, resumed by the same launch it
  gives the uninterrupted run's losses bitwise, resumed on 1 process (cpt/consolidate.py) to 1e-5;
* OLoRA (a base-rewriting init) under FSDP2: the 1-process losses, and the converted export on the original base; its
  checkpoint (written with 1 CPU thread per rank) resumed on 1 process with 2 threads over the factors it stores;
* PiSSA (full SVD) under ZeRO-2 (`launch.sh run.yaml zero2`): the 1-process losses, the converted export, and a resume
  by the same launch from its step-3 checkpoint (which stores the factors) bitwise.

Seven launches."""

import json
import shutil
from pathlib import Path

import pytest

from cpt.config import load_config
from launching import ROOT, after, assert_close, evals, finish, losses, rank_env, start, two_process_config, world_sizes
from launching import runs_once
from launching import write_config as write

pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 3


def make_cfg(tiny_cpt_data, base, out: Path, variant: str = "dora") -> dict:
    cfg = two_process_config(tiny_cpt_data, base, out, steps=STEPS, eval_every=EVERY, lora=True, weight_decay=0.0,
                             checkpoint={"every": EVERY, "keep": 5})
    if variant == "dora":
        cfg["model"]["lora"].update(use_dora=True, loraplus_lr_ratio=4.0, train_norms=True)
    else:  # a base-rewriting init (cpt/adapter_init.py)
        cfg["model"]["lora"].update(init_lora_weights=variant)
    return cfg


def launch(strategy: str, cfg: dict, cfg_path: Path, *extra: str) -> str:
    # (ACCELERATE_USE_CPU would turn DeepSpeed into plain DDP: tests/launching.py)
    env = {**rank_env(cpu=strategy in ("ddp", "fsdp"), fsdp_on_cpu=strategy == "fsdp"), "NUM_GPUS": "2"}
    rc, log = finish(start([str(ROOT / "scripts" / "launch.sh"), str(write(cfg, cfg_path)), strategy, *extra],
                           cfg_path.parent, env))
    assert rc == 0, log[-5000:]
    return log


@pytest.fixture(scope="module")
def reference(tiny_cpt_data, tiny_base, tmp_path_factory):
    """Each variant's 1-process run (in-process), on first use."""
    from cpt.train import train

    def one(variant: str, d: Path) -> None:
        train(load_config(base=make_cfg(tiny_cpt_data, tiny_base, d / "run", variant)), echo=lambda *a, **k: None)

    return runs_once(tmp_path_factory, one)


@pytest.fixture(scope="module")
def two(tiny_cpt_data, tiny_base, tmp_path_factory):
    """``"<strategy>"`` (DoRA + LoRA+) or ``"<strategy>-<init>"``: the 2-process run, launched on first use."""
    def launched(key: str, d: Path) -> str:
        strategy, _, variant = key.partition("-")
        return launch(strategy, make_cfg(tiny_cpt_data, tiny_base, d / "run", variant or "dora"), d / "run.yaml")

    return runs_once(tmp_path_factory, launched)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_dora_with_loraplus_on_two_processes_gives_the_one_process_run_and_exports(strategy, two, reference,
                                                                                   tiny_cpt_data, tiny_base):
    """(ZeRO-3: DoRA reads each base weight in the layer's forward, gathered there like the base layer's own. DDP,
    which all-reduces the adapters' gradients as any LoRA's, is not launched here for the CI budget: LoRA under DDP,
    tests/test_train_distributed.py; DoRA's own training on one process, tests/test_lora_variants.py.)"""
    run = two(strategy)
    assert world_sizes(run) == {2}
    assert_close(losses(run), losses(reference("dora")))
    assert_close(evals(run), evals(reference("dora")))
    assert exported_loss(run, tiny_cpt_data, tiny_base) == pytest.approx(evals(run)[STEPS], abs=1e-5)


def exported_loss(run: Path, tiny_cpt_data, tiny_base) -> float:
    """The held-out loss of the run's adapter export on the original base, through peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig
    from cpt.evaluate import heldout_loss

    cfg = make_cfg(tiny_cpt_data, tiny_base, run)
    h = HeldoutConfig(name="python", path=str(tiny_cpt_data / "data" / "python" / "heldout"), tag="downstream")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(run / "export")).eval()
    tokens = load_heldout(h, AutoTokenizer.from_pretrained(run / "export"), cfg["data"]["seq_len"],
                          cfg["eval"]["tokens_per_set"])
    return heldout_loss(peft, tokens, 16)


def test_olora_under_fsdp2_gives_the_one_process_run_and_exports_a_lora_of_the_original_base(two, reference,
                                                                                             tiny_cpt_data, tiny_base):
    """OLoRA rewrites the base (FSDP2: on rank 0, which holds the weights, broadcast to the other); the run's export,
    gathered on the main process and converted, is a plain LoRA that gives the logged held-out loss on the original
    base."""
    run = two("fsdp-olora")
    assert world_sizes(run) == {2}
    assert_close(losses(run), losses(reference("olora")))
    r = make_cfg(tiny_cpt_data, tiny_base, run, "olora")["model"]["lora"]["r"]
    assert json.loads((run / "export" / "adapter_config.json").read_text())["r"] == 2 * r
    assert exported_loss(run, tiny_cpt_data, tiny_base) == pytest.approx(evals(run)[STEPS], abs=1e-5)


def test_pissa_under_zero2_gives_the_one_process_run_exports_and_resumes_exactly(two, reference, tiny_cpt_data,
                                                                                   tiny_base, tmp_path):
    """ZeRO-2 partitions only what trains (the adapter's gradients and Adam state): the residual base stays whole on
    every rank, as under DDP. (ZeRO-3, which partitions the base, is refused: tests/test_lora_variants.py.)"""
    from cpt.adapter_init import FACTORS_FILE

    run = two("zero2-pissa")
    assert world_sizes(run) == {2}
    assert_close(losses(run), losses(reference("pissa")))
    assert exported_loss(run, tiny_cpt_data, tiny_base) == pytest.approx(evals(run)[STEPS], abs=1e-5)
    assert (run / "checkpoints" / "step_00000003" / FACTORS_FILE).is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(resumed / "export")
    launch("zero2", make_cfg(tiny_cpt_data, tiny_base, resumed, "pissa"), tmp_path / "resumed.yaml", "--resume")
    assert [losses(resumed)[s] for s in range(EVERY + 1, STEPS + 1)] == [losses(run)[s] for s in range(EVERY + 1, STEPS + 1)]


def test_an_fsdp2_dora_checkpoint_holds_the_magnitudes_and_resumes_exactly(two, tiny_cpt_data, tiny_base,
                                                                                   tmp_path):
    from cpt.consolidate import layout, read_model_state, read_optimizer_state
    from cpt.train import train

    run = two("fsdp")
    ckpt = run / "checkpoints" / f"step_{EVERY:08d}"
    assert layout(ckpt) == "fsdp"
    weights = read_model_state(ckpt)
    magnitudes = [k for k in weights if ".lora_magnitude_vector.default" in k]
    assert len(magnitudes) == 2 * 7 and all(k in read_optimizer_state(ckpt) for k in magnitudes)  # 2 layers x 7 Linear

    def killed_after_step_3(out: Path) -> dict:
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
        return make_cfg(tiny_cpt_data, tiny_base, out)

    log = launch("fsdp", killed_after_step_3(tmp_path / "resumed"), tmp_path / "resumed.yaml", "--resume")
    assert "resumed" in log and "another backend" not in log, log[-3000:]
    assert losses(tmp_path / "resumed") == after(run, EVERY)  # bitwise: the same backend and world size, fp32
    assert evals(tmp_path / "resumed") == after(run, EVERY, of=evals)

    result = train(load_config(base=killed_after_step_3(tmp_path / "one")), resume=True, echo=lambda *a, **k: None)
    assert result.step == STEPS and world_sizes(tmp_path / "one") == {1}
    assert_close(losses(tmp_path / "one"), after(run, EVERY))

    assert json.loads((run / "export" / "adapter_config.json").read_text())["use_dora"] is True


def test_an_olora_fsdp2_checkpoint_resumes_on_one_process_with_other_threads_over_its_stored_factors(
        two, tiny_cpt_data, tiny_base, tmp_path):
    """The job requeued on another number of processes and threads: the 2-process FSDP2 run's step-3 checkpoint (1 CPU
    thread per rank), resumed on 1 process with 2 threads (cpt/consolidate.py), whose QR would come out different
    there; the residual is rebuilt from the original base and the factors the checkpoint stores (rank 0 wrote them):
    the 2-process run's losses, and an export that is a plain LoRA of the original base giving its last held-out loss."""
    from cpt.adapter_checkpoint import ADAPTER_BASE
    from cpt.adapter_init import FACTORS_FILE
    from cpt.train import train
    from test_lora_variants import cpu_threads

    run = two("fsdp-olora")
    ckpt = run / "checkpoints" / f"step_{EVERY:08d}"
    assert (ckpt / FACTORS_FILE).is_file()
    out = tmp_path / "one"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    with cpu_threads(2):
        result = train(load_config(base=make_cfg(tiny_cpt_data, tiny_base, out, "olora")), resume=True,
                       echo=lambda *a, **k: None)
    assert result.step == STEPS and world_sizes(out) == {1}
    assert_close(losses(out), after(run, EVERY))
    fingerprint = lambda d: json.loads((d / ADAPTER_BASE).read_text())["fingerprint"]  # noqa: E731
    assert fingerprint(out / "checkpoints" / f"step_{STEPS:08d}") == fingerprint(ckpt)  # the same residual base
    assert exported_loss(out, tiny_cpt_data, tiny_base) == pytest.approx(evals(out)[STEPS], abs=1e-5)
