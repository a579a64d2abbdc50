"""FP8 training of a full model's Linear layers (``train.fp8``) through torchao's float8 training
(``torchao.float8.convert_to_float8_training``), as torchtitan, llm-foundry and OLMo-core offer it.

Which layers: every ``nn.Linear`` whose in and out features are multiples of 16 (what ``torch._scaled_mm`` takes),
except the output head (``lm_head``: cpt's chunked loss reads its weight directly, cpt/chunked_loss.py; the head
is also the layer most sensitive to low precision) and mixture-of-experts routers (``...gate``, ``...router``: a
small matmul whose scores pick the experts). Each converted layer becomes torchao's ``Float8Linear``: its weight
stays the same fp32 (or bf16) ``nn.Parameter`` under the same state-dict key, and each matmul of the forward and
backward casts its operands to float8 with dynamic scales (the recipe says per tensor or per row). Checkpoints,
resume and the HF export are therefore unchanged in format.

Where: after the model is built/loaded and prepared (vocab, freezing) and before the optimizer, torch.compile and
accelerate.prepare (FSDP2 shards the converted modules): cpt/train.py ``_with_optimizer``.

Under FSDP2 with ``train.fp8_all_gather`` (tensorwise only, opt-in) the weights are all-gathered in float8 (torchao's
``enable_fsdp_float8_all_gather``: :func:`convert_for_run`, :func:`prepare`, :func:`after_update`;
docs/training.md#fp8-training).

Requirements, checked before anything loads (one ConfigError naming the field): torchao (``pip install
'cpt[fp8]'``), ``train.precision: bf16`` (torchao runs the float8 matmuls under bf16 autocast: its ``Float8Linear``
casts its input to the autocast dtype, and outputs bf16), a full model (not ``model.lora``), and on CUDA a GPU of
compute capability 8.9 or more (Ada, Hopper, Blackwell: float8 tensor cores). On CPU it runs (torch's CPU
``_scaled_mm``) for testing only: slow, no speed-up. Tested with one process, FSDP2 and DeepSpeed ZeRO-3
(tests/test_fp8.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch
from torch import nn

from cpt.config.base import ConfigError
from cpt.distributed import Backend, backend

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao's Float8LinearRecipeName values
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell
ROUTER_NAMES = ("gate", "router")  # the last name part of a mixture-of-experts router (Mixtral, Qwen MoE, OLMoE)
INSTALL = "pip install 'cpt[fp8]' (torchao)"


def check_config(cfg) -> None:
    """The checks that need only the run config (``cfg``: RunConfig), before anything loads."""
    recipe = cfg.train.fp8
    if recipe is None:
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"train.fp8: {recipe} needs torchao, which is not installed: {INSTALL}")
    try:
        from torchao.float8 import Float8LinearConfig
    except ImportError as e:
        raise ConfigError(f"train.fp8: torchao's float8 training cannot be imported ({e}): {INSTALL}") from None
    if not hasattr(Float8LinearConfig, "from_recipe_name"):
        raise ConfigError("train.fp8: the installed torchao is too old (no Float8LinearConfig.from_recipe_name): "
                          + INSTALL)


def check_device(device: torch.device) -> str | None:
    """Refuse a device without float8 matmuls (a CUDA GPU below compute capability 8.9, MPS, ...); on CPU a note
    for the run log (testing only), else None."""
    if device.type == "cpu":
        return ("train.fp8 on CPU: torch's CPU float8 matmuls, for testing only (slow, no speed-up; "
                "the speed-up needs a CUDA GPU of compute capability 8.9+)")
    if device.type != "cuda":
        raise ConfigError(f"train.fp8 needs a CUDA GPU of compute capability {_cc(MIN_CAPABILITY)} or more "
                          f"(H100, L40S, RTX 4090, B200), not the {device.type} device; set train.fp8: null")
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"train.fp8 needs a CUDA GPU of compute capability {_cc(MIN_CAPABILITY)} or more "
                          f"(float8 tensor cores: H100, L40S, RTX 4090, B200); this {name} is {_cc(capability)}: "
                          "set train.fp8: null (bf16 is the fastest on it)")
    return None


def qualifies(module: nn.Module, name: str, head: nn.Module | None) -> bool:
    """Whether the Linear ``module`` (at ``name``) trains in float8: both sizes multiples of 16, not the output
    head, not a mixture-of-experts router."""
    if not isinstance(module, nn.Linear) or module is head or name.rsplit(".", 1)[-1] == "lm_head":
        return False
    if name.rsplit(".", 1)[-1] in ROUTER_NAMES:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def select(model: nn.Module) -> tuple[set[str], int]:
    """(the names of the Linear layers of ``model`` that train in float8, the number of its Linear layers); a
    ConfigError if none qualifies. Works on a model on the meta device too (`cpt train --dry-run`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name for name, m in linears.items() if qualifies(m, name, head)}
    if not chosen:
        sizes = sorted({(m.in_features, m.out_features) for m in linears.values()})[:4]
        raise ConfigError(f"train.fp8: none of the model's {len(linears)} Linear layers qualifies for float8 (both "
                          f"sizes multiples of 16, not lm_head or a router; sizes seen: {sizes}): set train.fp8: null")
    return chosen, len(linears)


def float8_config(recipe: str, all_gather: bool = False):
    """torchao's Float8LinearConfig of ``recipe``; ``all_gather``: FSDP2 all-gathers the weights in float8
    (``enable_fsdp_float8_all_gather``: the tensorwise recipe only, torchao refuses it for the rowwise ones)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=True) if all_gather else config


def convert(model: nn.Module, recipe: str, all_gather: bool = False) -> tuple[int, int]:
    """Swap the qualifying Linear layers of ``model`` (:func:`select`) for torchao's Float8Linear (in place; the same
    weight Parameters, which with ``all_gather`` hold torchao's WeightWithDynamicFloat8CastTensor, the FSDP2 float8
    all-gather's weight). Returns (converted, all Linear layers)."""
    from torchao.float8 import convert_to_float8_training

    chosen, total = select(model)
    convert_to_float8_training(model, config=float8_config(recipe, all_gather),
                               module_filter_fn=lambda m, fqn: fqn in chosen)
    for name, m in model.named_modules():
        if name in chosen:
            m.register_forward_pre_hook(_cpu_autocast_input)
    return len(chosen), total


def _cpu_autocast_input(module, args):
    """torchao's Float8Linear casts its input to the autocast dtype of CUDA autocast only; CPU autocast (the test
    runs) gets the same cast here, so the CPU runs take the GPU's dtype path (else rowwise_with_gw_hp's
    high-precision grad_weight matmul meets an fp32 input and a bf16 gradient)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return (x.to(torch.get_autocast_dtype("cpu")), *args[1:])
    return None


def preflight(cfg, acc, say) -> None:
    """``train.fp8``: torchao and the device, checked at the start before anything loads (the config's
    own checks, model.lora and train.precision, are RunConfig's); on CPU a log line saying it is for testing only."""
    if cfg.train.fp8 is None:
        return
    check_config(cfg)
    if note := check_device(acc.device):
        say(note)


def convert_for_run(model: nn.Module, cfg, acc, say) -> nn.Module:
    """``train.fp8``: the conversion (after :func:`preflight`), with a run-log line ("train.fp8: N of M Linear layers
    in float8 (recipe ...)"). Before the optimizer, compile and accelerate.prepare."""
    recipe = cfg.train.fp8
    if recipe is None:
        return model
    fsdp = backend(acc) is Backend.FSDP
    all_gather = cfg.train.fp8_all_gather and fsdp  # (the config allows it with tensorwise only)
    converted, total = convert(model, recipe, all_gather)
    say(f"train.fp8: {converted} of {total} Linear layers in float8 (recipe {recipe}; lm_head, routers and layers "
        "with a size not a multiple of 16 stay in bf16)")
    if all_gather:
        say("train.fp8: FSDP2 float8 all-gather (the weights gathered in float8, their per-tensor scales computed "
            "in one all-reduce after each update)")
    elif cfg.train.fp8_all_gather:
        say(f"train.fp8_all_gather: no effect under {backend(acc).value} (FSDP2 only)")
    return model


def uses_all_gather(model: nn.Module) -> bool:
    """Whether ``model``'s float8 layers all-gather their weights in float8 (:func:`convert` with ``all_gather``)."""
    float8_linear = sys.modules.get("torchao.float8.float8_linear")  # (imported by any conversion; no torchao: None)
    return float8_linear is not None and any(
        isinstance(m, float8_linear.Float8Linear) and m.config.enable_fsdp_float8_all_gather for m in model.modules())


def rewrap_shards(model: nn.Module) -> int:
    """Every float8 all-gather weight's local shard as torchao's WeightWithDynamicFloat8CastTensor on every rank;
    returns how many were plain. accelerate's FSDP2 loading (``fsdp_cpu_ram_efficient_loading``, the shipped
    configs/accelerate/fsdp.yaml) broadcasts rank 0's weights and assigns them (``load_state_dict(assign=True)``):
    rank 0's shards keep the subclass, the other ranks' become plain tensors (built from ``torch.empty``), so rank 0
    all-gathered in float8 (with an amax all-reduce) and the others in bf16: the collectives no longer matched and
    the run hung at its first forward. FSDP2 reads the local shard again at its lazy init (the first forward)."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from torch.distributed.fsdp import FSDPModule

    def wrap(t, m):
        return WeightWithDynamicFloat8CastTensor(t, m.linear_mm_config, m.config.cast_config_weight.target_dtype)

    owners = {}  # id(weight) -> its Float8Linear, for the weights whose local shard is plain
    for m in model.modules():
        local = getattr(getattr(m, "weight", None), "_local_tensor", None)
        if (isinstance(m, Float8Linear) and m.config.enable_fsdp_float8_all_gather and local is not None
                and not isinstance(local, WeightWithDynamicFloat8CastTensor)):
            m.weight._local_tensor = wrap(local, m)
            owners[id(m.weight)] = m
    for fsdp in (m for m in model.modules() if isinstance(m, FSDPModule)):  # FSDP2's own view of the shard too
        group = fsdp._get_fsdp_state()._fsdp_param_group
        for param in group.fsdp_params if group is not None else ():
            if id(param.sharded_param) in owners:
                param._sharded_param_data = wrap(param._sharded_param_data, owners[id(param.sharded_param)])
    return len(owners)


def prepare(acc, model: nn.Module, optimizer):
    """``acc.prepare(model, optimizer)``; with the float8 all-gather, two repairs after it (accelerate 1.15's FSDP2
    prepare does not expect torchao's weight subclass unless accelerate itself does the fp8 conversion):

    * the optimizer's parameters: accelerate maps each to its sharded one by ``data_ptr()``, which is 0 for every
      WeightWithDynamicFloat8CastTensor, so all float8 weights of the optimizer became one and the same weight (measured:
      the second step's gradient norm off by 18%); they are set again here by name (no optimizer state exists yet);
    * the local shards, the same subclass on every rank (:func:`rewrap_shards`)."""
    if not uses_all_gather(model):
        return acc.prepare(model, optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    model, optimizer = acc.prepare(model, optimizer)
    sharded = {n.replace("_orig_mod.", ""): p for n, p in acc.unwrap_model(model).named_parameters()}
    for group, group_names in zip(optimizer.param_groups, groups):
        group["params"] = [sharded[n.replace("_orig_mod.", "")] for n in group_names]
    rewrap_shards(model)
    return model, optimizer


def after_update(model: nn.Module) -> None:
    """After the weights changed (an optimizer step, a Reptile meta-update; first before the loop: the start
    weights): with the float8 all-gather, every weight's per-tensor scale for the next all-gathers, in one all-reduce
    (torchao's ``precompute_float8_dynamic_scale_for_fsdp``, as torchtitan calls it after ``optimizer.step()``);
    else nothing."""
    if getattr(model, "_cpt_fp8_all_gather", None) is None:
        model._cpt_fp8_all_gather = uses_all_gather(model)
    if model._cpt_fp8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)


@contextlib.contextmanager
def swapped_scales(model: nn.Module, swapped):
    """``swapped``, a context that swaps other weights into ``model`` for a while (the EMA's evaluation), with the
    float8 all-gather's scales to match (:func:`after_update`; else nothing more): computed once the other weights are
    in, and for the live weights again once they are back (also after an error)."""
    try:
        with swapped:
            after_update(model)
            yield
    finally:
        after_update(model)


def converted_layers(model: nn.Module) -> list[str]:
    """The names of the model's Float8Linear layers (tests, reports)."""
    from torchao.float8.float8_linear import Float8Linear

    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]


def _cc(capability) -> str:
    return ".".join(str(x) for x in capability)
