"""The files of a resume checkpoint as cpt writes them itself (one process and DDP, so that a save can go on in the
background): a host-memory snapshot of what ``accelerator.save_state`` writes, under the same file names, and a
writer that streams each file to disk, hashing it as it goes (nothing is read back after a save). The commit
protocol around them (temporary folder, CHECKSUMS.json, rename) is cpt/checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import torch

from cpt.adapter_checkpoint import adapter_items, without_base
from cpt.distributed import Backend, backend
from cpt.fileio import HashingFile, fault_point, file_digest
from cpt.host_memory import tensor_bytes


@contextlib.contextmanager
def _no_tied_weights_warning():
    """Without accelerate's "Removed shared tensor {'lm_head.weight'} while saving ... check ... while reloading"
    warning, which a model with tied embeddings (Llama-3.2-1B, SmolLM2, ...) put into the log at every checkpoint:
    the tied copy is left out of the file as safetensors requires and comes back on load (resume is tested exact)."""
    log = logging.getLogger("accelerate.utils.other")
    quiet = _DropMessage("Removed shared tensor")
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def host_snapshot(acc, staging: dict | None = None, fits=None) -> tuple[list, str, dict, bool]:
    """What ``accelerator.save_state`` writes, under the same file names: the models (safetensors; a LoRA or
    model.freeze model's state without the frozen base: cpt/adapter_checkpoint.py) and optimizers and the grad scaler
    (main process), this rank's RNG states; and whether it was staged.
    ``staging``: host buffers to copy the state into (kept between saves: pinned on CUDA, allocated once); None
    (a synchronous save: nothing changes until it is written) copies nothing: :func:`write_files` takes the live
    tensors to host memory a tensor (safetensors) or a file (torch.save) at a time. ``fits(need)``: called on every
    rank (collective) with the bytes the buffers would grow by; False: this save is not staged (synchronous)."""
    import random

    import numpy as np

    parts, error = [], None  # (name, kind, payload, staging key or None)
    try:
        parts = _parts(acc) if acc.is_main_process else []
    except Exception as e:  # noqa: BLE001 - raised once every rank has been through fits' gather (collective)
        error = e
    if staging is not None and fits is not None:
        need = sum(tensor_bytes(payload, lambda path, t: reusable(staging.get(path), t), key)
                   for _, _, payload, key in parts if key is not None)
        if not fits(need, error):  # (kept buffers too small for this save are let go: its write needs the room)
            staging.clear()
            staging = None
    if error is not None:
        raise error
    items = [(name, kind, payload if key is None or staging is None else host_copy(payload, staging, key))
             for name, kind, payload, key in parts]
    if staging is not None and acc.is_main_process and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    rng = {"step": acc.step, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
           "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return items, f"random_states_{acc.process_index}.pkl", rng, staging is not None


def _parts(acc) -> list[tuple]:
    """The main process's (file name, kind, state, staging key or None): references to the live state, no copies."""
    from accelerate.utils import clean_state_dict_for_safetensors

    parts = []
    for i, model in enumerate(acc._models):
        unwrapped = acc.unwrap_model(model, keep_torch_compile=False)
        if len(acc._models) == 1 and without_base(unwrapped):  # LoRA, model.freeze: not the frozen base
            parts += [(name, kind, payload, ("model", i) if kind == "safetensors" else None)
                      for name, kind, payload in adapter_items(unwrapped)]
            continue
        with _no_tied_weights_warning():
            state = clean_state_dict_for_safetensors(acc.get_state_dict(model, unwrap=False))
        parts.append((_numbered("model.safetensors", i), "safetensors", dict(state), ("model", i)))
    for i, opt in enumerate(acc._optimizers):
        parts.append((_numbered("optimizer.bin", i), "torch", opt.state_dict(), ("optimizer", i)))
    if acc.scaler is not None:
        parts.append(("scaler.pt", "torch", acc.scaler.state_dict(), ("scaler",)))
    return parts


def write_files(folder: Path, items: list, step: int) -> dict[str, str]:
    """Write (name, kind, payload) items, each hashed while written and fsynced; returns their digests.
    kind: "safetensors" (a dict of tensors), "torch" (torch.save) or "text". Device tensors (a synchronous save's
    live state) reach host memory a tensor (safetensors) or an item (torch.save) at a time: the write's host memory
    peaks at the largest item, not the whole state."""
    digests = {}
    for name, kind, payload in items:
        with HashingFile(folder / name, partial_fault=f"{name}:partial@{step}") as f:
            if kind == "safetensors":
                write_safetensors(f, payload)
            elif kind == "torch":
                torch.save(host_copy(payload), f)  # (as CPU tensors, whatever device they train on)
            else:
                f.write_all(payload.encode())
        digests[name] = f.digest
        fault_point(f"{name}:done@{step}")
    return digests


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$|zero_pp_rank_(\d+)_|random_states_(\d+)\.pkl$")


def backend_file_digests(acc, folder: Path, hashed=()) -> dict[str, str]:
    """The digests of the files of ``folder`` that the backend or accelerate wrote for this rank, read back (nothing
    hashed them as they were written): DCP's ``__<r>_*.distcp``, DeepSpeed's ``*zero_pp_rank_<r>_*``,
    ``random_states_<r>.pkl``, and on the main process the files no rank owns (``.metadata``, ``latest``, ZeRO-1/2's
    model states, DeepSpeed's recovery scripts); ``hashed``: paths (relative to ``folder``) already hashed, not read
    again. After a synchronous FSDP or DeepSpeed save (every file), and in a non-blocking one's staging (the small
    files written then: cpt/sharded_save.py, cpt/zero_save.py). Every rank reads its own share; the main process
    gathers them into CHECKSUMS.json."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if not p.is_file() or rel in hashed:
            continue
        m = _RANK_FILE.search(p.name)
        owner = int(next(g for g in m.groups() if g is not None)) if m else 0
        if owner == acc.process_index:
            out[rel] = file_digest(p)
    return out


def write_safetensors(f: HashingFile, tensors: dict[str, torch.Tensor], chunk: int = 1 << 24) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian tensor bytes), streamed
    tensor by tensor in pieces. ``safetensors.torch.save`` would build the whole file in memory while holding
    the GIL, stalling the training thread for the length of a background save; the files are read back by
    safetensors itself (accelerate's load_state)."""
    import struct

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name in names:
        data = tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])


def host_copy(obj, staging: dict | None = None, path: tuple = ()):
    """Tensors copied to host memory, contiguous (nested dicts/lists/tuples walked; other values kept).
    With ``staging`` the copies go into its buffers (keyed by ``path``; made on first use); without it
    host tensors are kept as they are."""
    if isinstance(obj, torch.Tensor):
        if staging is None:
            return obj.detach().to("cpu").contiguous()
        return staged_copy(obj, staging, path)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v, staging, (*path, k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, staging, (*path, i)) for i, v in enumerate(obj))
    return obj


def staged_copy(t: torch.Tensor, staging: dict, key) -> torch.Tensor:
    """``t`` copied into ``staging[key]``, a host buffer kept between saves (made on first use, again if the shape or
    dtype changed; pinned, and the copy non-blocking, for a CUDA tensor)."""
    t = t.detach()
    buf = staging.get(key)
    if not reusable(buf, t):
        buf = staging[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    return buf.copy_(t, non_blocking=t.is_cuda)


def reusable(buf: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether a kept host buffer can take ``t`` (no new memory)."""
    return buf is not None and buf.shape == t.shape and buf.dtype == t.dtype


def _numbered(name: str, i: int) -> str:
    return name if i == 0 else name.replace(".", f"_{i}.", 1)


def cpt_can_write(acc) -> bool:
    """Whether cpt writes the accelerate checkpoint files itself (and so can write in the background):
    one process or DDP, with nothing registered that only ``accelerator.save_state`` knows how to save."""
    return (backend(acc) in (Backend.SINGLE, Backend.DDP)
            and not acc._schedulers and not acc._dataloaders and not acc._custom_objects
            and not acc._save_model_state_pre_hook)
