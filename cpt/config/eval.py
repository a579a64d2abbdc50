"""The ``eval`` section: held-out evaluation (cpt/evaluate.py) and lm-eval tasks in the loop (eval_harness/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cpt.config.base import PathText, Seed, Strict


class LmEvalTask(Strict):
    """An lm-eval task (or group/tag) to run in the loop; tagged tasks get forgetting/adaptation deltas."""

    name: str = Field(min_length=1)
    tag: Literal["upstream", "downstream"] | None = None
    limit: int | None = Field(None, gt=0)  # documents (a seeded subset); default: eval.lm_eval.limit


class SamplesConfig(Strict):
    """Text samples at each held-out evaluation (cpt/samples.py): each prompt continued by the model, greedily
    (``temperature`` 0, the default) or sampled at ``temperature`` from the ``top_p`` nucleus, seeded by ``seed``
    (default: run.seed), the step and the prompt: a resumed run writes the uninterrupted one's text."""

    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Seed | None = None

    @model_validator(mode="after")
    def _sampling_options_need_sampling(self) -> "SamplesConfig":
        if self.temperature == 0 and (self.top_p != 1.0 or self.seed is not None):
            given = ", ".join(f for f in ("top_p", "seed") if getattr(self, f) != type(self).model_fields[f].default)
            raise ValueError(f"{given}: set for greedy samples (temperature 0), where they do nothing; set "
                             "eval.samples.temperature > 0 to sample")
        return self


class LmEvalConfig(Strict):
    # task names (untagged) or {name, tag: upstream|downstream, limit}; see eval_harness/benchmarks.py
    tasks: list[LmEvalTask] = Field(default_factory=list)
    every: int | None = Field(None, gt=0)  # steps; None: at the start (eval.at_start) and the end only
    at_end: bool = True
    dense: bool = False  # also at the held-out dense points after each stage switch (eval.dense_steps/dense_every)
    limit: int | None = Field(None, gt=0)  # documents per task: a seeded subset, the same at every evaluation
    seed: Seed | None = None  # of the subsets; default: run.seed
    bootstrap_iters: int = Field(100, ge=2)  # stderrs: closed form for accuracies, a bootstrap for ratio metrics
    include_path: PathText | None = None  # folder of task YAMLs; default: eval_harness/tasks
    batch_size: int = Field(8, gt=0)
    # lm-eval's context length (HFLM max_length: longer prompts are cut from the left, perplexity documents are
    # scored in windows of it); default: data.seq_len. lm-eval run alone on an export defaults to the model's
    # context instead: pass max_length=<this> in its model_args to get the in-loop scores
    max_length: int | None = Field(None, gt=0)

    @field_validator("tasks", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: list[LmEvalTask]) -> list[LmEvalTask]:
        names = [t.name for t in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate tasks {dup}")
        return v


class EvalConfig(Strict):
    every: int | None = Field(100, gt=0)  # steps; None: at the start, the dense points and the end only
    at_start: bool = True
    # evaluate every `dense_every` steps during the first `dense_steps` steps of each stage (stability gap)
    dense_steps: int = Field(0, ge=0)
    dense_every: int = Field(10, gt=0)
    # per held-out set: a seeded sample of whole documents up to this many tokens (the whole set if it fits),
    # the same sample at every evaluation (cpt/data/loader.py sample_heldout)
    tokens_per_set: int = Field(262144, gt=0)
    sample_seed: Seed = 0
    batch_size: int = Field(8, gt=0)
    # also evaluate the EMA weights (train.ema_decay) on the held-out sets: ema/eval/<name>/loss (and, with
    # eval.samples, continue the prompts with them too: rows marked "weights": "ema")
    ema: bool = False
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    # continuations of fixed prompts (greedy or sampled) at each held-out evaluation: samples.jsonl, a W&B table, the log
    samples: SamplesConfig | None = None
