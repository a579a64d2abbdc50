"""Model options that change how the decoder layers run, not what they compute: Liger's Triton kernels
(``model.liger_kernel``) and activation checkpointing (``model.gradient_checkpointing``, every N-th layer with
``model.gradient_checkpointing_every``). ``model.compile`` is in :mod:`cpt.compiling`."""

from __future__ import annotations

import torch

from cpt.config import ConfigError


def apply_liger(model: torch.nn.Module, log_fn) -> None:
    """Liger's Triton kernels for the model's layers (RMSNorm, RoPE, SwiGLU...). Not its fused loss: the loss stays
    cpt's (train.chunked_loss: the same fused lm_head + cross-entropy, keeping the per-token losses that the
    per-source training loss needs)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        log_fn("model.liger_kernel: liger-kernel is not installed; continuing without its kernels")
        return
    if not torch.cuda.is_available():
        log_fn("model.liger_kernel: Liger's kernels need a CUDA GPU; continuing without them")
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log_fn(f"model.liger_kernel: Liger has no kernels for model type {model_type!r}; continuing without them")
        return
    _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    log_fn(f"model.liger_kernel: Liger kernels applied to the {model_type} layers (the loss stays cpt's)")


def checkpoint_layers(model, every: int, compile_mode: bool | str = False) -> None:
    """Activation checkpointing (non-reentrant) of every ``every``-th decoder layer; through transformers'
    ``activation_checkpointing_enable`` where it exists (``gradient_checkpointing_enable`` is deprecated there).
    ``compile_mode``: the run's ``model.compile`` (whether the input embeddings' output is made to require grad)."""
    import inspect

    import transformers

    enable, kwargs = getattr(model, "activation_checkpointing_enable", None), {"use_reentrant": False}
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    elif every != 1:
        raise ConfigError(f"model.gradient_checkpointing_every: {every} needs a transformers with "
                          f"activation_checkpointing_enable(every_n_layers) (this is {transformers.__version__}); use 1")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers (5) also hooks the input embeddings so that their output requires grad, which the reentrant
    # checkpoint needs under a frozen embedding (LoRA, model.freeze) and the non-reentrant one does not (the same
    # gradients, bitwise). Under model.compile: true the hook's requires_grad_() breaks the graph (6 graph breaks in a
    # 2-layer LoRA Llama): removed there and in eager runs. Under model.compile: regional it runs eagerly, outside the
    # compiled layers, and is needed: a checkpointed layer whose input and weights all need no gradient (model.freeze
    # of the bottom layers) would compile as an inference graph, where torch cannot rematerialise a checkpoint
    # ("does not support RNG ops in recompute regions"); so there it is added where transformers did not.
    hooked = getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None)
    if compile_mode == "regional" and not hooked:
        model.enable_input_require_grads()
    elif compile_mode != "regional" and hooked:
        model.disable_input_require_grads()
