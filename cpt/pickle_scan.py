"""The pickles in a checkpoint that a library reads by full unpickling (which can run code), checked before it does.

accelerate reads its own files (``optimizer.bin``, ``random_states_<rank>.pkl``, ...) with
``torch.load(weights_only=True)`` (checked here too: :func:`check_accelerate_pickles`), and cpt's own files are
safetensors and JSON. Two readers a checkpoint is handed to
do not restrict what they unpickle:

* DeepSpeed (its ``load_checkpoint`` under accelerate's ``load_state``, and ``zero_to_fp32``): ``torch.load(...,
  weights_only=False)`` of each ZeRO file in ``pytorch_model/``;
* torch.distributed.checkpoint's ``FileSystemReader`` (FSDP2 checkpoints): ``pickle.load`` of each folder's
  ``.metadata`` file, and ``torch.load(..., weights_only=False)`` of each non-tensor value stored in its ``.distcp``
  files (an optimizer's ``param_names``, ...).

Before a checkpoint is loaded (a resume, a new stage from it, ``cpt export``, a move to another world size or
backend), :func:`check_checkpoint_pickles` reads those pickles without running them: the ZeRO files and the stored
values through torch's own scan (``get_unsafe_globals_in_checkpoint``: the globals beyond what ``weights_only``
allows), the ``.metadata`` files through an unpickler that builds nothing but DCP's metadata classes, torch sizes,
dtypes and layouts, and paths. A file that names anything else is refused in one line (:class:`PickleCheckError`).
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

DEEPSPEED_FOLDER = "pytorch_model"  # accelerate's folder of DeepSpeed's files (= cpt.adapter_checkpoint.DEEPSPEED_TAG)
DCP_METADATA = ".metadata"

# the only globals besides those weights_only allows that DeepSpeed's ZeRO files name
ZERO_SAFE_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")
# what a DCP .metadata pickle may build beyond plain containers and numbers: DCP's metadata classes
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
              ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
              ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


def zero_safe_classes() -> list:
    """The classes of :data:`ZERO_SAFE_GLOBALS`, for ``torch.serialization.safe_globals`` where cpt reads a ZeRO file
    itself with ``weights_only=True``."""
    import importlib

    return [getattr(importlib.import_module(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]) for name in ZERO_SAFE_GLOBALS]


class PickleCheckError(RuntimeError):
    """A checkpoint file whose pickle names a global its reader would not need, or that cannot be scanned (the message
    names the file)."""


def _refuse(f, names) -> None:
    raise PickleCheckError(f"{f}: refusing to unpickle it: it names {', '.join(sorted(names))}, beyond what a "
                            "checkpoint of its kind holds (a pickle can run code)")


def _check_torch_pickles(files, allowed) -> None:
    """Each torch-saved file of ``files`` names no global beyond ``allowed`` (and what weights_only allows)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for f in files:
        with _scanning(f):
            unsafe = set(get_unsafe_globals_in_checkpoint(str(f))) - set(allowed)
        if unsafe:
            _refuse(f, unsafe)


def check_zero_pickles(files) -> None:
    """Each of DeepSpeed's checkpoint ``files`` names no global beyond :data:`ZERO_SAFE_GLOBALS` (and weights_only's)."""
    _check_torch_pickles(files, ZERO_SAFE_GLOBALS)


# what accelerate's own weights_only loads allow beyond torch's (accelerate.utils.other.TORCH_SAFE_GLOBALS: the numpy
# RNG state in random_states_<rank>.pkl)
ACCELERATE_SAFE_GLOBALS = ("numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                           "numpy.core.multiarray._reconstruct", "codecs.encode", "_codecs.encode",
                           "numpy.dtypes.UInt32DType")


def check_accelerate_pickles(ckpt: str | Path) -> None:
    """accelerate's files in checkpoint ``ckpt`` (``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``,
    ``custom_checkpoint_<i>.pkl``, ...) name no global beyond what its loads allow. accelerate reads most of them with
    ``weights_only=True``, which refuses such a file, but as a traceback from inside ``load_state`` (an
    ``optimizer.bin``), or, for the random states, silently (logged at INFO level): the resume went on with another
    RNG state. ``custom_checkpoint_*.pkl`` it unpickles unrestricted."""
    files = sorted(p for p in Path(ckpt).iterdir() if p.suffix in (".bin", ".pkl", ".pt") and p.is_file())
    _check_torch_pickles(files, ACCELERATE_SAFE_GLOBALS)


@contextlib.contextmanager
def _scanning(f):
    """A file the scan cannot read (truncated, not a torch file) is refused as such: DeepSpeed or DCP would fail on it
    too (a checkpoint whose CHECKSUMS.json verifies has none: cpt/checkpoint_dir.py)."""
    try:
        yield
    except PickleCheckError:
        raise
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, KeyError, AttributeError) as e:
        raise PickleCheckError(f"{f}: cannot read it to check it before unpickling: {e}") from None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if module in _DCP_MODULES or (module, name) in _DCP_NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Forbidden(f"{module}.{name}")


class _Forbidden(pickle.UnpicklingError):
    """A global the metadata unpickler does not build."""


def read_dcp_metadata(folder: str | Path):
    """The DCP ``.metadata`` of ``folder``, unpickled by the restricted unpickler (what ``FileSystemReader`` would read),
    each stored non-tensor value checked by torch's scan; :class:`PickleCheckError` names what else a file names."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from torch.serialization import get_unsafe_globals_in_checkpoint

    path = Path(folder) / DCP_METADATA
    try:
        with open(path, "rb") as fh:
            meta = _MetadataUnpickler(fh).load()
    except _Forbidden as e:
        _refuse(path, [str(e)])
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError, AttributeError) as e:
        raise PickleCheckError(f"{path}: cannot read it to check it before unpickling: {e}") from None
    for index, info in (getattr(meta, "storage_data", None) or {}).items():
        if not isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # (tensors: read by DCP with weights_only=True)
        where = Path(folder) / info.relative_path
        if getattr(info, "transform_descriptors", None):
            raise PickleCheckError(f"{where}: {index.fqn} is stored transformed ({', '.join(info.transform_descriptors)}): "
                                    "cpt cannot check it before torch.distributed.checkpoint unpickles it")
        with _scanning(where), open(where, "rb") as fh:
            fh.seek(info.offset)
            unsafe = get_unsafe_globals_in_checkpoint(io.BytesIO(fh.read(info.length)))
        if unsafe:
            _refuse(f"{where} ({index.fqn})", unsafe)
    return meta


def check_checkpoint_pickles(ckpt: str | Path) -> None:
    """Every pickle of checkpoint ``ckpt`` that DeepSpeed or DCP would unpickle unrestricted (see the module doc), and
    accelerate's own (:func:`check_accelerate_pickles`)."""
    ckpt = Path(ckpt)
    check_accelerate_pickles(ckpt)
    check_zero_pickles(sorted((ckpt / DEEPSPEED_FOLDER).glob("*.pt")))
    for meta in sorted(ckpt.glob(f"*/{DCP_METADATA}")):
        read_dcp_metadata(meta.parent)
