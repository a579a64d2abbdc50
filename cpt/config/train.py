"""The ``optim`` and ``train`` sections: AdamW and its parameter groups (cpt/optim.py), and the loop's settings
(batch sizes, precision, init/anneal branches, EMA, Reptile, spike skipping, the loss path)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from cpt.config.base import PathText, Strict


class OptimConfig(Strict):
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: float = Field(1e-8, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    fused: bool | None = None  # None: fused AdamW when on CUDA
    decay_embeddings: bool = True  # apply weight decay to embedding matrices
    # module-name regex -> LR multiplier, e.g. {"embed_tokens": 0.1, "lm_head": 0.5}
    lr_multipliers: dict[str, float] = Field(default_factory=dict)
    # LR multiplier for layers with index < K: {"below": K, "multiplier": m}
    lower_layers: dict[str, float] | None = None


class ReptileConfig(Strict):
    """Reptile meta-updates (the gradient alignment of MER, see cpt/reptile.py): every `every` optimizer steps,
    weights <- anchor + epsilon * (weights - anchor)."""

    every: int = Field(gt=0)
    epsilon: float = Field(gt=0, le=1)


class SpikeConfig(Strict):
    """Skip the update of a loss/grad-norm spike (see cpt/spikes.py): above mean + sigma * std of the last
    `window` steps (once `min_history` are known; default window // 2); the window restarts at stage switches."""

    sigma: float = Field(6.0, gt=0)
    window: int = Field(128, ge=2)
    min_history: int | None = Field(None, ge=2)
    max_in_a_row: int = Field(8, gt=0)


class ProfileConfig(Strict):
    """torch.profiler over a window of optimizer steps (see cpt/profiling.py): a trace and a table of the costliest
    operations per profiled rank, under <output_dir>/profile/. Steps are numbered as in metrics.jsonl (from 1)."""

    start_step: int = Field(10, ge=1)  # the first profiled step (leave the first steps to compilation and warm-up)
    steps: int = Field(2, gt=0)
    ranks: list[int] | Literal["all"] = Field(default_factory=lambda: [0])  # process indices that record
    record_shapes: bool = False  # input shapes of every op in the trace (more overhead)
    with_stack: bool = False  # Python stacks in the trace (much more overhead)
    memory: bool = False  # allocations in the table; on CUDA also a memory snapshot (https://pytorch.org/memory_viz)

    @field_validator("ranks", mode="before")
    @classmethod
    def _ranks(cls, v):  # says what the field takes, with an example (the generic union line would not)
        if v != "all" and not isinstance(v, list):
            raise ValueError(f"a list of process indices (e.g. [0, 3]) or 'all', not {v!r}")
        if v == []:  # (accepted: the run profiled nothing and said nothing)
            raise ValueError("an empty list profiles no process: name some (e.g. [0]), or leave train.profile out")
        return v


class TrainConfig(Strict):
    global_batch_size: int = Field(64, gt=0)  # sequences per optimizer step, over all ranks
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward pass per rank
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # FP8 training (cpt/fp8.py, torchao's float8 training; pip install 'cpt[fp8]'): the Linear layers (not lm_head or
    # MoE routers; sizes multiples of 16) matmul in float8 with dynamic scales per tensor ("tensorwise", fastest), per
    # row ("rowwise") or per row with the weight gradient in bf16 ("rowwise_with_gw_hp", most accurate). Needs
    # train.precision bf16, a full model (not model.lora), a GPU of compute capability 8.9+ (H100); on CPU: tests only
    fp8: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] | None = None
    # FSDP2 with fp8 tensorwise: all-gather the weights in float8 (half the bytes of bf16; torchao's
    # enable_fsdp_float8_all_gather), their scales computed in one all-reduce after each update. Opt-in: checked on
    # CPU processes only (no GPU run yet); other backends: no effect (a log line says so)
    fp8_all_gather: bool = False
    log_every: int = Field(10, gt=0)
    max_nonfinite_in_a_row: int = Field(5, gt=0)
    # start weights (and optionally optimizer) from this checkpoint/run dir, not its data position
    init_from: PathText | None = None
    init_optimizer: bool = False
    # anneal branch: from `init_from`, anneal for this many steps (see `cpt train --anneal`)
    anneal_steps: int | None = Field(None, gt=0)
    anneal_shape: Literal["linear", "cosine", "exponential", "1-sqrt"] = "linear"
    ema_decay: float | None = Field(None, gt=0, lt=1)
    reptile: ReptileConfig | None = None
    skip_spikes: SpikeConfig | None = None
    # a tqdm bar when stdout is a terminal; otherwise (batch jobs) and when false: a plain line every log_every steps
    progress_bar: bool = True
    # next-token loss over chunks of positions, never the full [B, L, vocab] logits (cpt/chunked_loss.py):
    # "auto" where the model supports it (else the full-logits loss, with a logged reason), true (or an error), false
    chunked_loss: bool | Literal["auto"] = "auto"
    loss_chunk_tokens: int = Field(1024, gt=0)  # positions per chunk: memory ~ chunk x vocab x 4 bytes
    # mixture-of-experts models: the router load-balancing loss added to the training loss with this coefficient;
    # None: the model's own `router_aux_loss_coef` (0.001 for Mixtral and Qwen MoE, 0.01 for OLMoE), 0: off.
    # Refused for a dense model (no router). Logged as train/router_aux_loss (cpt/lm_loss.py)
    router_aux_loss_coef: float | None = Field(None, ge=0)
    # z-loss (PaLM, OLMo 2): this weight x mean(logsumexp(logits)^2) added to the training loss, keeping the softmax
    # normaliser near 0 (stability in bf16); 0: off. Logged as train/z_loss; train/loss stays the next-token loss
    z_loss: float = Field(0.0, ge=0)
    peak_flops: float | None = Field(None, gt=0)  # per-device peak bf16 FLOP/s for MFU (train.fp8 too); None: from the device name
    # with several processes on GPUs: steps between the all-rank checks for a preemption signal (each costs a host sync)
    preemption_check_every: int = Field(10, gt=0)
    # seconds a collective (gradient all-reduce, barrier) waits for the other ranks before the run fails instead of
    # hanging on a hung or lost rank; above the longest work one rank does alone (an export, a checkpoint write)
    distributed_timeout_s: int = Field(1800, gt=0)
    # a rank still running this many seconds after a stop signal (SIGTERM, SIGUSR1), or after losing another rank
    # (then 20 s at most), writes the stacks of its threads to stderr (the job's log): where a hang on the way out
    # is, before the scheduler's SIGKILL (SLURM's KillWait, 30 s by default, after SIGTERM); None: off
    stop_stack_dump_s: float | None = Field(60.0, gt=0)
    # TF32 tensor cores for fp32 matmuls on CUDA (what fp32 ops remain under bf16 autocast; all of them in fp32 runs)
    tf32: bool = True
    profile: ProfileConfig | None = None  # torch.profiler over a few steps (off by default)
