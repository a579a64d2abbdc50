"""``model.compile``: torch.compile of the whole model (``true``) or of each repeated transformer block
(``regional``, the PyTorch "regional compilation" recipe and torchtitan's per-block compile).

Whole-model compile traces every decoder layer into one graph, so its start-up cost grows with the depth (about 60 s
for a 16-layer 1.2B Llama on an H200 before the first step). Regional compile compiles the decoder layers in place
(``nn.Module.compile``): dynamo traces one layer once and every other layer reuses that code (with
``inline_inbuilt_nn_modules``, the default in recent torch, a layer's parameters are graph inputs, not constants, so
there is no recompile per layer); the embedding, the final norm and the output head (which the chunked loss patches)
stay eager, but for the chunked loss's per-chunk softmax and gradient (:func:`cpt.chunked_loss.chunk_terms`, a pure
function of the chunk's logits: compiled, it reads them in a few fused passes instead of the eager loop's ten or so).

In-place compile leaves the module tree as it is: the model keeps its class and its ``state_dict`` keys (no
``_orig_mod.`` prefix), so checkpoints and exports are the same with and without it; hooks added later (FSDP2's
``fully_shard``, accelerate's) stay on the call path, as in accelerate's own ``compile_regions_fsdp2``; peft's LoRA
layers sit inside the blocks and are compiled with them; transformers' gradient checkpointing of a layer's
``forward`` is traced by dynamo as a checkpointed region.

The causal mask under whole-model compile (:func:`keep_causal_sdpa`). With ``attn_implementation: sdpa``, rows
without padding and the default positions, transformers passes no mask and ``is_causal=True`` to
``scaled_dot_product_attention``, which lets it use its FlashAttention kernel (the masked blocks are skipped). While
dynamo traces (``model.compile: true``) it cannot look at the values that decision reads, so it builds the whole
``[B, 1, L, L]`` boolean mask (causal, and per packed sequence of the position ids, which the model makes itself),
and SDPA with an explicit mask cannot use FlashAttention: it takes the memory-efficient kernel, which also computes
every masked block of the upper triangle. cpt knows what transformers cannot see while tracing: with
``data.document_masking`` off its rows are plain causal (packed, never padded, default positions). So a whole
compiled model gets transformers' own sdpa attention under a mask function that returns no mask while cpt's own
forward runs over plain rows (:func:`packed_rows`, set by cpt/lm_loss.py) and otherwise is transformers' (document masking, padded
lm-eval batches, generation, sliding windows). The mask is kept wherever a model asks for more than the causal
mask: a model whose modules call the mask functions with ``allow_is_causal_skip=False`` (they add to the mask: Doge's
dynamic mask, Falcon's ALiBi, Mistral Large 4's indexer) or with an ``or_mask_function``/``and_mask_function`` is
left on stock sdpa (:func:`asks_for_a_mask`), and bidirectional masks are never dropped. Regional compile does not
need this: the mask is built eagerly, outside the compiled layers, where transformers makes the same decision itself.
"""

from __future__ import annotations

import contextlib
import types
from typing import Literal

import torch
from torch import nn

from cpt import chunked_loss
from cpt.config import ConfigError

CompileMode = bool | Literal["regional"]
COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper (OptimizedModule) holds the model as its `_orig_mod` child


class CompileError(ConfigError):
    """``model.compile: regional`` on a model without repeated blocks (`cpt train` prints it as one line)."""


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks (its decoder layers), outermost only, in module order.

    The blocks are the modules whose class transformers names in ``_no_split_modules`` (the units it never splits
    across devices: the decoder layer of every causal LM), looked up through wrappers (peft, DDP) by walking the
    module tree; without such a declaration, the children of the longest ``nn.ModuleList`` whose children all share
    one class (the ``layers`` list). Empty if neither exists."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(type(m), "_no_split_modules", None) or ())
    blocks = _outermost(model, lambda m: type(m).__name__ in names) if names else []
    if blocks:
        return blocks
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) and all(type(c) is type(m[0]) for c in m)]
    return list(max(lists, key=len)) if lists else []


def _outermost(model: nn.Module, is_block) -> list[nn.Module]:
    """Modules for which ``is_block`` holds and that lie inside no other such module."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if is_block(m) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def compile_model(model: nn.Module, mode: CompileMode, log=None, **compile_kwargs) -> nn.Module:
    """The model to train under ``model.compile``: ``False`` the model itself; ``True`` ``torch.compile(model)``;
    ``"regional"`` the model itself with each repeated block compiled in place (:func:`repeated_blocks`), reported
    through ``log``. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend="aot_eager"`` in tests)."""
    if mode is False:
        return model
    if mode is True:
        keep_causal_sdpa(model)
        traceable_router_capture(model, True)
        traceable_lora_experts(model)
        traceable_dora(model)
        return torch.compile(model, **compile_kwargs)
    if mode != "regional":
        raise CompileError(f"model.compile must be true, false or regional, not {mode!r}")
    blocks = repeated_blocks(model)
    if not blocks:
        raise CompileError(f"model.compile=regional: no repeated blocks (decoder layers) found in "
                           f"{type(model).__name__}; use model.compile=true to compile the whole model")
    traceable_router_capture(model, "regional")
    traceable_lora_experts(model)
    traceable_dora(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    loss = chunked_loss.compile_chunk_terms(model, **compile_kwargs)  # (the head itself stays eager)
    if log is not None:
        kinds = sorted({type(b).__name__ for b in blocks})
        log(f"model.compile=regional: {len(blocks)} blocks ({', '.join(kinds)}) compiled in place, the rest eager"
            + (" but for the chunked loss's per-chunk softmax and gradient" if loss else ""))
    return model


def traceable_router_capture(model: nn.Module, mode: CompileMode) -> None:
    """Before a mixture of experts is compiled: let dynamo trace the hooks through which transformers 5 records its
    router logits (from which its forward computes the load-balancing loss cpt trains with), so that they break no
    graph. Nothing for a model that records no router logits.

    * Whole model: the hooks are installed now, once, on the outermost transformers model (where none are yet:
      twice would record each router twice). transformers installs them in the first forward that asks for router
      logits: inside the compiled forward, a ``threading.Lock`` and ``register_forward_hook`` broke the graph 8 times
      and the compiled code kept the breaks.
    * Regional: transformers' collector of the recorded outputs becomes a plain attribute (:class:`_PlainCollector`).
      It is a ContextVar, which dynamo cannot read; transformers switches to a plain global only when the collector is
      set inside a compiled frame, which a regionally compiled model's forward never is: the router hook broke every
      compiled layer's graph (6 breaks, 7 graphs) and ran eagerly at every step. The cost: the collector is no longer
      per thread (cpt runs its forwards in one thread).
    * Under gradient checkpointing the hook's append is a side effect inside the checkpointed region, which dynamo
      refuses (a graph break per layer) unless it may skip replaying it in the recomputation
      (``skip_fwd_side_effects_in_bwd_under_checkpoint``): eager replays it too, as a no-op, since the recomputation
      runs after the forward has put its collector away.
    """
    from transformers import PreTrainedModel

    try:
        from transformers.utils import output_capturing
    except ImportError:  # (older transformers return router logits without hooks)
        return
    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if "router_logits" not in (getattr(top, "_can_record_outputs", None) or {}):
        return
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if mode == "regional":
        if hasattr(output_capturing, "_active_collector") and not isinstance(output_capturing._active_collector,
                                                                             _PlainCollector):
            output_capturing._active_collector = _PlainCollector()
    elif not any(getattr(m, "_output_capturing_hooks_installed", False)
                 for m in model.modules() if isinstance(m, PreTrainedModel)):
        output_capturing.maybe_install_capturing_hooks(top)


def traceable_lora_experts(model: nn.Module) -> None:
    """Before a model with LoRA on a mixture of experts' fused expert weights is compiled: let dynamo trace the
    adapted experts' forward. peft (0.21) adapts a fused ``[experts, in, out]`` weight with a ``ParamWrapper``
    (``gate_up_proj``, ``down_proj``), whose forward registers an ``nn.utils.parametrize`` parametrization on the
    experts module and removes it again: dynamo cannot trace the class swap and attribute deletion that this does (a
    Mixtral of 2 layers, regional compile: 8 graph breaks, 16 graphs, the experts run eagerly at every step). Each
    outermost ``ParamWrapper`` (peft nests one per adapted weight) now calls the experts module once through
    ``torch.func.functional_call`` with each adapted weight replaced by the weight peft's parametrization computes
    (``W + scaling * lhs @ rhs`` in one ``baddbmm`` outside autocast; several adapters: ``W + sum of the deltas``).
    A merged or disabled adapter, a mixed-adapter batch, a low-precision (fp8) weight and a weight that ZeRO-3
    partitions (gathered only when its own module runs) keep peft's own forward."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    for w in wrappers:
        if id(w) not in inner:
            w.forward = types.MethodType(_lora_experts_forward, w)


def traceable_dora(model: nn.Module) -> None:
    """Before a model with DoRA layers (``model.lora.use_dora``) is compiled: let dynamo trace them. peft's (0.21)
    DoRA forward breaks the graph in every DoRA layer twice over (a 4-layer Llama with DoRA on q/v, whole compile:
    21 graph breaks and 18 graphs instead of 1; regional: 33 frames instead of 2):

    * it reads the base weight through ``dequantize_module_weight``, which tests ``type(weight).__module__.startswith(
      "torchao.")``, and dynamo (torch 2.13) cannot trace that on an ``nn.Parameter``. The function in peft's DoRA
      module is replaced by one that returns an exact ``nn.Parameter`` of a module without HQQ's ``W_q`` at once
      (what peft's returns for it) and hands every other weight (bitsandbytes, torchao, HQQ, FSDP's plain tensors)
      to peft's own;
    * in training it clears its (always empty) norm cache at every call; inside a checkpointed layer that mutation is
      a side effect dynamo refuses to trace. Each DoRA layer clears it only when it holds something."""
    try:
        from peft.tuners.lora import dora
    except ImportError:
        return
    layers = [m for m in model.modules() if isinstance(m, dora.DoraLinearLayer)]
    if not layers:
        return
    if not getattr(dora.dequantize_module_weight, "_cpt_traceable", False):
        dora.dequantize_module_weight = _traceable_dequantize(dora.dequantize_module_weight)
    for layer in layers:
        layer._cache_clear = types.MethodType(_clear_cache_if_filled, layer)


def _clear_cache_if_filled(self) -> None:
    if self._dora_cache:
        self._dora_cache.clear()


def _traceable_dequantize(peft_dequantize):
    def dequantize_module_weight(module: nn.Module):
        weight = module.weight
        if type(weight) is nn.Parameter and not hasattr(module, "W_q"):
            return weight
        return peft_dequantize(module)

    dequantize_module_weight._cpt_traceable = True
    return dequantize_module_weight


def _lora_experts_forward(self, x, *args, **kwargs):
    """A ``ParamWrapper`` chain's forward without parametrizations (:func:`traceable_lora_experts`)."""
    chain, base = [], self
    while hasattr(base, "parameter_name") and hasattr(base, "lora_A"):
        chain.append(base)
        base = base.base_layer
    names = [w.parameter_name for w in chain]
    if (kwargs.get("adapter_names") is not None or len(set(names)) < len(names)
            or any(w.disable_adapters or w.merged for w in chain)
            or any(getattr(base, n).dtype not in (torch.float32, torch.bfloat16, torch.float16)
                   or hasattr(getattr(base, n), "ds_id") for n in names)):  # (ZeRO-3 gathers it inside `base`)
        return type(self).forward(self, x, *args, **kwargs)
    weights = {}
    for w in chain:
        adapters = [a for a in w.active_adapters if a in w.lora_A]
        if adapters:
            weights[w.parameter_name] = _adapted_weight(w, getattr(base, w.parameter_name), adapters)
    return torch.func.functional_call(base, weights, (x, *args), kwargs)


def _adapted_weight(wrapper, weight: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """The weight peft's parametrization gives ``wrapper.parameter_name`` with ``adapters`` active."""
    if len(adapters) == 1 and wrapper.num_experts > 1 and hasattr(wrapper, "get_delta_factors"):
        lhs, rhs, scaling = wrapper.get_delta_factors(adapters[0])
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs, rhs, alpha=scaling)
    return weight + sum(wrapper.get_delta_weight(a) for a in adapters)


class _PlainCollector:
    """transformers' output collector (``output_capturing._active_collector``: which outputs the running forward
    records, read by the hook on each router) as a plain attribute, with a ContextVar's get/set/reset."""

    value = None

    def get(self):
        return self.value

    def set(self, value):
        token, self.value = (self.value,), value
        return token

    def reset(self, token) -> None:
        self.value = token[0] if token else None


CAUSAL_SDPA = "cpt_causal_sdpa"  # the attention implementation keep_causal_sdpa registers in transformers
# inside packed_rows(): "plain" rows need the causal mask and nothing else; "documents" rows have positions that
# restart after every EOS (data.document_masking); None: not a cpt forward over packed rows
_rows: str | None = None


@contextlib.contextmanager
def packed_rows(kind: Literal["plain", "documents"] | None):
    """While active, the model's forward runs over cpt's packed rows of this ``kind``: ``"plain"`` (positions
    0..L-1, no padding: a model given :func:`keep_causal_sdpa` attends with SDPA's ``is_causal`` and no mask) or
    ``"documents"`` (positions that restart after every EOS, made by cpt/data/masking.py). Either way transformers'
    packed-sequence check is answered without reading the position ids back (:func:`_no_packed_check_read`)."""
    global _rows
    if kind is not None:
        _no_packed_check_read()
    before, _rows = _rows, kind
    try:
        yield
    finally:
        _rows = before


def _no_packed_check_read() -> None:
    """Outside tracing (eager, and the eager parts of ``model.compile: regional``) transformers looks for packed
    sequences in the position ids (``masking_utils.find_packed_sequence_indices``) and reads the answer back,
    ``if (...).all()``: a host-device synchronisation in every forward, which stops the host from queuing the next
    micro-batch's kernels ahead of the device. cpt knows the answer: plain rows (positions 0..L-1, which the model
    makes itself) hold no packed sequence (``None``); document rows are packed, and their sequence indices are
    returned without the read (a row with one document then gets the causal mask built, not skipped: the same
    attention). Installed once in transformers' module (its mask functions look the name up there); outside
    :func:`packed_rows` (lm-eval, generation, user code) the check runs as before."""
    try:
        from transformers import masking_utils
    except ImportError:
        return
    real = getattr(masking_utils, "find_packed_sequence_indices", None)
    if real is None or getattr(real, "_cpt_packed_rows", False):
        return

    def find_packed_sequence_indices(position_ids):
        if _rows == "plain":
            return None
        if _rows == "documents":  # transformers' computation, without its read-back
            first = position_ids[:, :1] - 1
            return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
        return real(position_ids)

    find_packed_sequence_indices._cpt_packed_rows = True
    find_packed_sequence_indices.__doc__ = real.__doc__
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices


def _causal_sdpa_mask(*args, **kwargs):
    """transformers' sdpa mask function, but no mask inside ``packed_rows("plain")`` when the call asks for the mask
    of a whole sequence from position 0 with no padding mask and no local window narrower than it (as transformers
    itself decides outside tracing; the function is called with keywords only, by ``create_causal_mask`` and its
    kin)."""
    from transformers.masking_utils import sdpa_mask

    q_offset, kv_offset, window = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0), kwargs.get("local_size")
    if (_rows == "plain" and not args and kwargs.get("attention_mask") is None
            and "allow_is_bidirectional_skip" not in kwargs  # (create_bidirectional_mask and its kin)
            and "q_length" in kwargs and kwargs["q_length"] == kwargs.get("kv_length")
            and (window is None or kwargs["kv_length"] < window)  # (a sliding window or chunk wider than the row)
            and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0):
        return None
    return sdpa_mask(*args, **kwargs)


def keep_causal_sdpa(model: nn.Module) -> bool:
    """Give a transformers model that uses ``sdpa`` attention :data:`CAUSAL_SDPA` instead: the same attention
    function, with :func:`_causal_sdpa_mask` (see the module's docstring). Returns whether it did; models with
    another attention implementation, or transformers without its attention registries, are left as they are.
    The name is not saved: transformers does not write ``_attn_implementation`` into config.json."""
    from cpt.chunked_loss import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", CAUSAL_SDPA) or asks_for_a_mask(lm):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(CAUSAL_SDPA, _causal_sdpa_mask)
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(CAUSAL_SDPA)
    else:
        config._attn_implementation = CAUSAL_SDPA
    return True


_MASK_MARKERS = ("allow_is_causal_skip=False", "or_mask_function", "and_mask_function")


def asks_for_a_mask(model: nn.Module) -> bool:
    """Whether a module of ``model`` builds its mask with more than the causal (or sliding-window) rule: its
    ``forward`` passes ``allow_is_causal_skip=False`` (it adds to the mask it gets) or an or/and mask function.
    Under tracing :func:`_causal_sdpa_mask` cannot tell these from a plain causal call (transformers also sets
    ``allow_is_causal_skip=False`` for the packed-sequence check it cannot run while tracing), so such models keep
    stock sdpa. A branch under ``if self.config.use_bidirectional_attention:`` counts only where that is on (Gemma 3
    text). Read from the source, so a forward whose source is not available counts as asking."""
    import ast
    import inspect
    import textwrap

    config = getattr(model, "config", None)
    for cls in {type(m) for m in model.modules()}:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
        except (OSError, TypeError, SyntaxError):
            if cls.__module__.startswith("transformers."):
                return True
            continue  # (torch's and peft's own modules, compiled in C or without mask calls)
        for node in ast.walk(tree):
            if (isinstance(node, ast.If) and ast.unparse(node.test) == "self.config.use_bidirectional_attention"
                    and not getattr(getattr(config, "get_text_config", lambda: config)(),
                                    "use_bidirectional_attention", False)):
                node.body = []
        if any(marker in ast.unparse(tree).replace(" ", "") for marker in _MASK_MARKERS):
            return True
    return False


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules compiled in place (``nn.Module.compile``) inside ``model``."""
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def without_compile_prefix(state: dict) -> dict:
    """``state`` keyed as the plain model's ``state_dict``: the keys a whole-model compile (``model.compile: true``,
    torch.compile's wrapper) writes start with ``_orig_mod.``, those of eager and regional runs do not."""
    return {k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k: v for k, v in state.items()}
