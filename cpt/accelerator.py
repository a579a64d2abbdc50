"""What cpt checks and fills in on the Accelerator a launch gives it: one source of truth for precision (the run
config's ``train.precision``), and DeepSpeed settings the loop needs whatever the user's JSON says.

accelerate takes mixed precision from three places: the ``Accelerator(mixed_precision=...)`` argument (cpt passes
``train.precision``), the launcher (``--mixed_precision`` or an accelerate config file's ``mixed_precision``, passed on
as ``ACCELERATE_MIXED_PRECISION``) and, under DeepSpeed, the JSON's ``bf16.enabled`` / ``fp16.enabled`` (an explicit
``true`` silently wins over the argument). cpt refuses a launcher or JSON setting that disagrees with
``train.precision`` instead of letting one of them win silently, and a JSON ``scheduler`` or ``optimizer`` block
(the run config owns the LR schedule and the optimizer). Likewise a launcher that asks accelerate to compile the model:
``model.compile`` does that.
"""

from __future__ import annotations

import os

ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision -> accelerate's mixed_precision


def launcher_precision_conflict(precision: str, environ=os.environ) -> str | None:
    """The error message if the launcher asked for a mixed precision other than ``train.precision``, else None.

    ``accelerate launch`` always exports ACCELERATE_MIXED_PRECISION ("no" when nothing was asked for), so "no"
    cannot be told apart from an explicit ``--mixed_precision no`` and counts as "not set".
    """
    launched = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched in ("no", "") or launched == ACCELERATE[precision]:
        return None
    return (f"train.precision is {precision} in the run config but the launcher asks for mixed_precision={launched} "
            "(accelerate launch --mixed_precision or the accelerate config file's mixed_precision): precision comes "
            "from train.precision; drop the launcher setting or set train.precision to match")


def launcher_compile_conflict(environ=os.environ) -> str | None:
    """The error message if the launcher asked accelerate to torch.compile the model, else None: accelerate would
    compile it in ``prepare`` on top of ``model.compile`` (over a regionally compiled model, the whole model again)."""
    launched = environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if launched in ("no", ""):
        return None
    return (f"the launcher asks accelerate to torch.compile the model (dynamo backend {launched}: accelerate launch "
            "--dynamo_backend or the accelerate config file's dynamo_config), on top of cpt's own: compile comes from "
            "model.compile (true: the whole model, regional: each decoder layer); drop the launcher setting")


def deepspeed_precision_conflict(precision: str, ds_config: dict) -> str | None:
    """The error message if the DeepSpeed JSON enables bf16/fp16 other than ``train.precision``, else None
    ("auto" is filled from train.precision by accelerate)."""
    want = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    for dtype, wanted in want.items():
        value = str(ds_config.get(dtype, {}).get("enabled", "auto")).lower()
        if value == "auto":
            continue
        if (value == "true") != wanted:
            return (f"train.precision is {precision} in the run config but the DeepSpeed config sets "
                    f"{dtype}.enabled={value}: precision comes from train.precision; set {dtype}.enabled to \"auto\" "
                    "in the DeepSpeed JSON")
    return None


# DeepSpeed JSON blocks for what the run config owns: DeepSpeed builds and steps a scheduler block's schedule, which
# cpt's set_lr overrides before every step (a block that looks in effect and is not), and an optimizer block clashes
# with the AdamW cpt builds from `optim` (param groups, lr_multipliers, weight decay; accelerate refused it with a traceback)
OWNED_BY_THE_RUN_CONFIG = {
    "scheduler": "cpt sets the learning rate itself at every step from the run config's stages (warmup, decay, "
                 "anneal_steps) and resumes it with its checkpoints",
    "optimizer": "cpt builds the optimizer (AdamW) from the run config's optim section (lr, weight_decay, betas, "
                 "lr_multipliers) and resumes it with its checkpoints",
}


def deepspeed_block_conflict(ds_config: dict) -> str | None:
    """One line if the DeepSpeed JSON has a ``scheduler`` or ``optimizer`` block (see :data:`OWNED_BY_THE_RUN_CONFIG`)."""
    for block, why in OWNED_BY_THE_RUN_CONFIG.items():
        if block in ds_config:
            return (f"the DeepSpeed config (deepspeed_config_file) has a \"{block}\" block, which cpt does not use: "
                    f"{why}; remove the block from the JSON and set it in the run config")
    return None


def precision_conflict(precision: str, acc) -> str | None:
    """One line naming both settings if the launch disagrees with ``train.precision``, else None."""
    problem = launcher_precision_conflict(precision)
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if problem is None and ds is not None:
        problem = deepspeed_precision_conflict(precision, ds.deepspeed_config)
    return problem


def configure_deepspeed(ds_config: dict, *, micro_batch: int, grad_accum: int, global_batch: int, grad_clip: float | None) -> None:
    """Fill in what cpt's loop needs (it prepares no dataloader, so DeepSpeed cannot infer the batch geometry)."""
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch
    ds_config["gradient_accumulation_steps"] = grad_accum
    ds_config["train_batch_size"] = global_batch
    if grad_clip is not None:
        ds_config["gradient_clipping"] = grad_clip
    # with optimizer offload, DeepSpeed runs our (torch AdamW) step on the CPU partitions
    ds_config["zero_force_ds_cpu_optimizer"] = False
    zero = ds_config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        # HF exports (periodic, final, LoRA adapters) gather the partitioned weights through accelerate's
        # get_state_dict, which needs this; it changes nothing else (resume checkpoints stay partitioned)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
