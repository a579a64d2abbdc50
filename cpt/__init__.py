"""cpt: continual pre-training of large language models."""

import logging as _logging
import sys as _sys

__version__ = "0.1.0"


class _ImportNoise(_logging.Filter):
    """Drops warnings logged when torchao or DeepSpeed is imported (transformers and accelerate import them whenever
    they are installed, so in every cpt process and on every rank, whatever the run uses) that say nothing to a cpt
    user: torch's deprecation notice about torchao's ``register_constant`` of Enum classes, and, on a machine without
    CUDA, torchao's "Failed to load .../_C*.so" for its CUDA kernels and "Detected no triton", and DeepSpeed's "Setting
    accelerator to CPU. If you have GPU ...", and bitsandbytes' "Failed to load CPU gemm_4bit_forward from
    kernels-community" (peft imports bitsandbytes in every LoRA command: an optional kernel fetched from the hub,
    which cpt never does). Every other record of those loggers passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "torch.utils._pytree":
            return "is an Enum subclass and is now natively supported" not in message
        if message.startswith("Failed to load CPU gemm_4bit_forward"):
            return False
        if ((message.startswith("Failed to load") and ".so" in message) or "Detected no triton" in message
                or message.startswith("Setting accelerator to CPU")):
            import torch

            return torch.cuda.is_available()
        return True


# (a logger's filters see only the records logged on it, not its children's)
for _name in ("torch.utils._pytree", "torchao", "torchao.kernel.intmm", "DeepSpeed", "bitsandbytes.backends.cpu.ops"):
    _logging.getLogger(_name).addFilter(_ImportNoise())


def is_cpt_program() -> bool:
    """Whether this process is the `cpt` program: `python -m cpt.cli ...` (its ``__main__`` is cpt/cli.py, and
    ``cpt.cli`` itself may never be imported) or the `cpt` console script (whose ``main`` is ``cpt.cli.main``); not a
    caller running training inside its own process (a notebook, the test suite), whose signal handlers cpt must not
    take over for good."""
    entry = _sys.modules.get("__main__")
    if getattr(getattr(entry, "__spec__", None), "name", None) == "cpt.cli":
        return True
    cli = _sys.modules.get("cpt.cli")
    return cli is not None and getattr(entry, "main", None) is getattr(cli, "main", False)
