"""cpt: continual pre-training of large language models."""

import logging as _logging

__version__ = "0.1.0"


class _ImportNoise(_logging.Filter):
    """Drops two warnings logged when torchao is imported (the `fp8` extra; transformers imports it whenever it is
    installed, so in every cpt process and on every rank) that say nothing to a cpt user: torch's deprecation notice
    about torchao's ``register_constant`` of Enum classes, and, on a machine without CUDA, torchao's "Failed to load
    .../_C*.so" for its CUDA kernels. Every other record of those loggers passes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "torch.utils._pytree":
            return "is an Enum subclass and is now natively supported" not in message
        if message.startswith("Failed to load") and ".so" in message:
            import torch

            return torch.cuda.is_available()
        return True


_logging.getLogger("torch.utils._pytree").addFilter(_ImportNoise())
_logging.getLogger("torchao").addFilter(_ImportNoise())
