"""The causal-LM forward over packed rows, shared by training and evaluation: its keyword arguments (document
positions when ``data.document_masking`` is on, never a KV cache, the router logits of a mixture of experts in
training) and the next-token loss per row, plus a mixture of experts' router load-balancing loss; the training loss
the loop logs over each log window (``train/loss``, ``train/loss/<source>``, ``train/router_aux_loss`` and
``train/z_loss``), kept on the device."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from cpt import chunked_loss
from cpt.compiling import packed_rows
from cpt.config import ConfigError
from cpt.data.masking import document_position_ids
from cpt.distributed import shards_weights


def model_inputs(input_ids: torch.Tensor, eos_id: int | None, router_logits: bool = False) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments for a causal-LM forward over packed rows (training or evaluation).

    ``use_cache=False`` always: no forward here needs a KV cache, and transformers only looks for packed
    ``position_ids`` when there is none (with the default cache the documents would silently see each other).
    ``position_ids`` restart after every EOS when ``eos_id`` is set (document masking on). ``router_logits``: a
    mixture of experts returns its router load-balancing loss (``aux_loss``), off in its config by default.
    """
    out: dict[str, torch.Tensor | bool] = {"input_ids": input_ids, "use_cache": False}
    if eos_id is not None:
        out["position_ids"] = document_position_ids(input_ids, eos_id)
    if router_logits:
        out["output_router_logits"] = True
    return out


def router_aux_coefficient(model, setting: float | None) -> float:
    """The weight of the router load-balancing loss in the training loss (``train.router_aux_loss_coef``): ``None``
    the model's own ``router_aux_loss_coef`` when it is a mixture of experts whose forward computes that loss
    (Mixtral, Qwen2/3 MoE, OLMoE, ...), else 0. transformers adds it only when its forward gets ``labels`` and
    ``output_router_logits`` is on, which its configs leave off: without this, a CPT run of an MoE model would train
    its routers with no balancing term at all. A coefficient set for a dense model is refused (no router)."""
    lm = chunked_loss.unwrap_causal_lm(model)
    own = getattr(getattr(lm, "config", None), "router_aux_loss_coef", None)
    try:
        routed = own is not None and "output_router_logits" in inspect.signature(type(lm).forward).parameters
    except (TypeError, ValueError):
        routed = False
    if setting is None:
        return float(own) if routed else 0.0
    if setting > 0 and not routed:
        raise ConfigError(f"train.router_aux_loss_coef: {setting} is set, but {type(lm).__name__} has no router "
                          "load-balancing loss (not a mixture of experts whose forward returns one); leave it unset")
    return float(setting)


class LossWeights(NamedTuple):
    """The weights of the terms added to the next-token loss in training: a mixture of experts' router
    load-balancing loss (``train.router_aux_loss_coef``, see :func:`router_aux_coefficient`) and the z-loss
    (``train.z_loss``: mean logsumexp(logits)^2, PaLM's and OLMo 2's, keeps the softmax normaliser near 0)."""

    router_aux: float = 0.0
    z: float = 0.0


def loss_weights(model, train_cfg, log_fn=print) -> LossWeights:
    """:class:`LossWeights` of a run (``train.router_aux_loss_coef``, ``train.z_loss``), each said once when on."""
    weights = LossWeights(router_aux_coefficient(model, train_cfg.router_aux_loss_coef), float(train_cfg.z_loss))
    if weights.router_aux > 0:
        said = "the model's router_aux_loss_coef" if train_cfg.router_aux_loss_coef is None else "train.router_aux_loss_coef"
        log_fn(f"mixture of experts: router load-balancing loss x {weights.router_aux:g} ({said}) added to the training "
               "loss, logged as train/router_aux_loss")
    if weights.z > 0:
        log_fn(f"z-loss: {weights.z:g} x mean(logsumexp(logits)^2) added to the training loss (train.z_loss), "
               "logged as train/z_loss")
    return weights


class LMLoss(NamedTuple):
    """A micro-batch's losses: ``loss`` to backpropagate (the mean next-token loss, plus the weighted router
    load-balancing loss of a mixture of experts and the weighted z-loss: :class:`LossWeights`); ``row_losses`` each
    row's mean next-token loss (detached, for per-source logging); ``router_aux`` the load-balancing loss itself and
    ``z_loss`` the z term added (both detached; None without)."""

    loss: torch.Tensor
    row_losses: torch.Tensor
    router_aux: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every predicted token, ``[B, L-1]``, in fp32 (as transformers' own loss upcasts)."""
    shifted = logits[:, :-1, :].float()
    per_token = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.size(-1)), input_ids[:, 1:].reshape(-1),
                                                  reduction="none")
    return per_token.view(input_ids.size(0), -1)


def causal_lm_loss(model, input_ids: torch.Tensor, eos_id: int | None = None,
                   weights: LossWeights = LossWeights()) -> LMLoss:
    """Next-token loss of packed rows (:class:`LMLoss`): the mean over every predicted token, for backward, with the
    terms ``weights`` asks for; each row's mean, detached, for per-source logging. Chunked (no full logits) where
    :func:`use_chunked_loss` installed it (its z term is computed chunk by chunk too)."""
    per_token, loss, aux, lse = _forward_losses(model, input_ids, eos_id, weights.router_aux > 0, weights.z)
    if loss is None:  # the full-logits path
        loss = per_token.mean()
        if lse is not None:
            loss = loss + weights.z * lse.square().mean()
    z_term = None if lse is None else weights.z * lse.detach().square().mean()
    if aux is not None:
        loss = loss + weights.router_aux * aux.to(loss.dtype)
        aux = aux.detach()
    return LMLoss(loss, per_token.detach().mean(dim=1), aux, z_term)


def token_losses(model, input_ids: torch.Tensor, eos_id: int | None = None) -> torch.Tensor:
    """Per-token next-token losses ``[B, L-1]`` (fp32) of ``model`` on packed rows (evaluation: call under no_grad)."""
    return _forward_losses(model, input_ids, eos_id)[0]


def _forward_losses(model, input_ids, eos_id, router_logits: bool = False, z_coef: float = 0.0):
    """(per-token losses, the chunked path's mean loss or None, the router load-balancing loss or None, the
    per-token log-partition or None: with ``z_coef`` > 0; differentiable on the full-logits path, where the z term is
    added by the caller). The model is always called through its wrappers (DDP, FSDP, DeepSpeed, compile)."""
    head = chunked_loss.installed(model)
    if head is None:
        out = _call(model, input_ids, eos_id, router_logits)
        logits = out.logits if hasattr(out, "logits") else out[0]
        lse = torch.logsumexp(logits[:, :-1, :].float(), dim=-1) if z_coef else None
        return next_token_losses(logits, input_ids), None, _router_aux(out, router_logits), lse
    with chunked_loss.head_targets(head, input_ids, z_coef):
        out = _call(model, input_ids, eos_id, router_logits)
    loss = out.logits if hasattr(out, "logits") else out[0]
    if head.per_token is None or loss.dim() != 0:
        raise RuntimeError("chunked loss: the model did not return its lm_head's loss as its logits "
                           f"(got shape {tuple(loss.shape)}); set train.chunked_loss: false for this model")
    return head.per_token, loss, _router_aux(out, router_logits), head.lse


def _router_aux(out, asked: bool) -> torch.Tensor | None:
    if not asked:
        return None
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        raise RuntimeError("train.router_aux_loss_coef: the model was asked for its router logits but returned no "
                           "load-balancing loss (aux_loss); set train.router_aux_loss_coef: 0 for this model")
    return aux


def _call(model, input_ids, eos_id, router_logits: bool = False):
    """The model's forward over packed rows; without document masking the rows need the causal mask alone, which
    :func:`cpt.compiling.packed_rows` says (SDPA's causal kernel under whole-model compile too); with it, positions
    restart after every EOS. Either way transformers' packed-sequence check does not read the positions back."""
    with packed_rows("plain" if eos_id is None else "documents"):
        return model(**model_inputs(input_ids, eos_id, router_logits))


def use_chunked_loss(model, mode: bool | str, chunk_tokens: int, accelerator=None, log_fn=print) -> bool:
    """Install the chunked next-token loss (:mod:`cpt.chunked_loss`) in ``model`` per ``train.chunked_loss``:
    ``"auto"`` where supported (else today's full-logits path, saying why), ``True`` or an error, ``False`` never.
    Returns whether it is installed."""
    if mode is False:
        return False
    try:
        chunked_loss.install(model, chunk_tokens, sharded=shards_weights(accelerator))
    except chunked_loss.Unsupported as e:
        if mode is True:  # (a RuntimeError: a traceback; `--dry-run` says the same, cpt/dryrun.py)
            raise ConfigError(f"train.chunked_loss: true, but {e}: set it to auto (the full-logits loss here)") from None
        log_fn(f"train.chunked_loss: {e}; using the full-logits loss")
        return False
    log_fn(f"loss: chunked next-token loss, {chunk_tokens} positions per chunk (train.chunked_loss)")
    return True


# ------------------------------------------------------------------ the training loss over the log window


class LossWindow:
    """``train/loss`` over the log window: the mean loss of its finite steps, kept on the device (no host sync
    until :meth:`mean`). A step's ``finite`` is a bool, or a 0-d bool tensor on the device-skip path."""

    def __init__(self, device):
        self.sum, self.count = torch.zeros((), device=device), torch.zeros((), device=device)

    def add(self, loss, finite) -> None:
        if finite is True:
            self.sum += loss
            self.count += 1
        elif finite is not False:
            self.sum += torch.where(finite, loss, 0.0)
            self.count += finite

    def mean(self, accelerator) -> float:
        """The all-rank mean over the window (a collective and one host read); starts a new window. NaN (null in
        metrics.jsonl) when every step of the window was skipped as non-finite (it said 0.0, a loss never reached)."""
        mean = accelerator.reduce(self.sum, reduction="mean") / self.count.clamp(min=1)
        value = torch.where(self.count > 0, mean, torch.nan).item()
        self.sum.zero_()
        self.count.zero_()
        return value


class SourceLoss:
    """Training loss per data source, ``train/loss/<source>``: the mean loss of the rows each source contributed
    since the last log. With replay this is a dense forgetting signal on the old data at no extra cost (the
    held-out evaluation is sparser and costs forward passes).

    Per micro-batch :meth:`add` the rows' sources and mean losses; after the step, :meth:`end_step` keeps them
    (or drops a skipped step's); :meth:`metrics` reduces over ranks and starts a new window. Runs on device,
    no host sync except in :meth:`metrics`."""

    def __init__(self, names: list[str], device):
        self.names = list(names)
        zeros = lambda: torch.zeros(len(self.names), dtype=torch.float64, device=device)  # noqa: E731
        self.step_sum, self.step_rows, self.sum, self.rows = zeros(), zeros(), zeros(), zeros()

    def add(self, sources, row_losses) -> None:
        self.step_sum.index_add_(0, sources, row_losses.double())
        self.step_rows.index_add_(0, sources, row_losses.new_ones(row_losses.shape, dtype=self.step_rows.dtype))

    def end_step(self, keep) -> None:
        """``keep``: a bool, or a 0-d bool tensor on the device (no host sync)."""
        if keep is True:
            self.sum += self.step_sum
            self.rows += self.step_rows
        elif keep is not False:
            self.sum += torch.where(keep, self.step_sum, torch.zeros_like(self.step_sum))
            self.rows += torch.where(keep, self.step_rows, torch.zeros_like(self.step_rows))
        self.step_sum.zero_()
        self.step_rows.zero_()

    def metrics(self, accelerator=None) -> dict[str, float]:
        both = torch.stack([self.sum, self.rows])
        if accelerator is not None and accelerator.num_processes > 1:
            both = accelerator.reduce(both, reduction="sum")
        sums, rows = both.tolist()
        self.sum.zero_()
        self.rows.zero_()
        return {f"train/loss/{n}": s / r for n, s, r in zip(self.names, sums, rows) if r > 0}


class LogWindow:
    """The open log window, ``train/loss`` (:class:`LossWindow`), ``train/loss/<source>`` (:class:`SourceLoss`) and,
    where the run has them, ``train/router_aux_loss`` and ``train/z_loss`` (each a :class:`LossWindow`: the mean over
    the window's finite steps, as ``train/loss``; they were the log step's alone) since the last log line, as a
    resumable component (cpt/state.py): a run stopped between two log steps resumes
    with the window's sums, so the next line is the uninterrupted run's (not the mean of the steps after the
    resume alone). ``state_dict`` is a collective (every rank saves): it holds every rank's sums. Loaded on the same
    number of processes, each rank takes its own (the next line is bitwise the uninterrupted one); on another, each
    rank takes the mean of the ``train/loss`` sums (a mean over ranks when logged) and the main process the total of
    the per-source sums (a sum over ranks when logged). A checkpoint written before this component existed resumes
    with an empty window."""

    missing_ok = True  # (cpt/state.py: restore)

    def __init__(self, accelerator, source_names: list[str]):
        self.acc = accelerator
        self.loss = LossWindow(accelerator.device)
        self.by_source = SourceLoss(source_names, accelerator.device)
        self.terms = {name: LossWindow(accelerator.device) for name in self.TERMS}
        self.used: set[str] = set()  # the terms this run has (the same on every rank: its collectives match)

    TERMS = {"train/router_aux_loss": "router_aux", "train/z_loss": "z_loss"}  # metric -> StepResult field

    def add(self, result) -> None:
        """A step's (:class:`cpt.train.StepResult`) losses: ``train/loss`` and the terms it has, finite steps only."""
        finite = result.outcome.finite
        self.loss.add(result.loss, finite)
        for name, field in self.TERMS.items():
            value = getattr(result, field, None)
            if value is not None:
                self.used.add(name)
                self.terms[name].add(value.detach().float(), finite)

    def term_metrics(self) -> dict[str, float]:
        """``train/router_aux_loss`` and ``train/z_loss`` over the window (the mean over its finite steps and the
        ranks), where the run has them; starts a new window (a collective each)."""
        return {name: self.terms[name].mean(self.acc) for name in self.TERMS if name in self.used}

    def state_dict(self) -> dict:
        sums = torch.cat([self.loss.sum.double().reshape(1), self.by_source.sum, self.by_source.rows]).unsqueeze(0)
        terms = torch.stack([self.terms[n].sum.double() for n in self.TERMS]).unsqueeze(0)
        if self.acc.num_processes > 1:
            sums, terms = self.acc.gather(sums), self.acc.gather(terms)
        return {"loss_count": self.loss.count.item(), "sources": self.by_source.names, "ranks": sums.tolist(),
                "terms": list(self.TERMS), "term_counts": [self.terms[n].count.item() for n in self.TERMS],
                "term_ranks": terms.tolist()}

    def load_state_dict(self, state: dict) -> None:
        saved, names = list(state["sources"]), self.by_source.names
        ranks, n, m = torch.tensor(state["ranks"], dtype=torch.float64), len(names), len(saved)
        gone = [j for j, x in enumerate(saved) if x not in names and ranks[:, 1 + m + j].any()]
        if gone:  # (a source left out of the run, with rows in the open window)
            raise ValueError(f"its log window has the sources {saved}, this run {names}")
        if saved != names:  # by name, in this run's order: a source new since the checkpoint has an empty window
            cols = [0] + [1 + saved.index(x) if x in saved else -1 for x in names]
            cols += [1 + m + saved.index(x) if x in saved else -1 for x in names]
            ranks = torch.cat([ranks, torch.zeros(len(ranks), 1, dtype=ranks.dtype)], 1)[:, cols]
        if len(ranks) == self.acc.num_processes:
            own = ranks[self.acc.process_index]
        else:  # another number of processes: the same logged means
            own = torch.cat([ranks[:, :1].mean(0), ranks[:, 1:].sum(0) * self.acc.is_main_process])
        self.loss.sum.fill_(own[0].item())
        self.loss.count.fill_(float(state["loss_count"]))
        self.by_source.sum.copy_(own[1:1 + n])
        self.by_source.rows.copy_(own[1 + n:])
        if "terms" in state:  # (a checkpoint written before the terms had a window: they start empty)
            sums = torch.tensor(state["term_ranks"], dtype=torch.float64)
            sums = sums[self.acc.process_index] if len(sums) == self.acc.num_processes else sums.mean(0)
            for j, name in enumerate(state["terms"]):
                if name in self.terms:
                    self.terms[name].sum.fill_(sums[j].item())
                    self.terms[name].count.fill_(float(state["term_counts"][j]))
