"""`cpt experiment`: the continual pre-training findings at small scale, in one command (docs/experiments.md).

A spec naming corpus A (the original distribution) and corpus B (the new one) runs the pair grid (Ibrahim et al.,
2024, "Simple and Scalable Strategies to Continually Pre-train Large Language Models"): base pre-training on A, CPT
on B for every replay share x schedule (re-warmed cosine, infinite with a final anneal) and variants, and a baseline
trained from scratch on A and B. A spec listing ``corpora: [A, B, C, ...]`` runs a dataset sequence instead: per
seed and strategy one run through every corpus with replay, anneal branches, from-scratch baselines, and the
forgetting matrix.

The package, in the order an experiment uses it::

    spec.py      ExperimentSpec (pair grid), SequenceSpec, their sections; load_spec
    corpora.py   corpora -> files, the BPE tokenizer, token shards and held-out sets
    plan.py      RunPlan, the pieces of a run config, LR schedule shapes, run_configs, whether a run finished
    grid.py      the pair grid's runs             sequence.py   a sequence's runs (trunks, anneal branches, baselines)
    results.py   the pair grid's table, curves    matrix.py     the forgetting matrix, its statistics and figures
    runner.py    run_experiment: the one loop (skip / resume / max_runs / preemption), the dry run, the messages

The experiment folder (``out``)::

    spec.yaml                 the resolved spec (secrets redacted)
    raw/, corpora/, tokenizer/, data/<corpus>/   the inputs (corpora.py)
    runs/<run>/               one `cpt train` run directory per run
    results.md, results.csv   the table (pair grid) or the forgetting matrices (sequence)
    curves.png                held-out losses (and, for a sequence, forgetting_matrix.png: one heatmap per strategy)
    report/                   `cpt report` over all runs

Finished runs (``export/config.json`` present and the metrics reaching the last step) are skipped; a
run with a valid checkpoint is resumed (``train(cfg, resume=True)``); a run directory with neither is
started again. A run directory whose saved config differs from the one the spec now asks for is an
error, never silently reused. So a killed experiment is continued by running the same command again.
"""

from cpt.experiment.runner import ExperimentPreempted, run_experiment
from cpt.experiment.spec import ExperimentError, ExperimentSpec, SequenceSpec, load_spec

__all__ = ["ExperimentError", "ExperimentPreempted", "ExperimentSpec", "SequenceSpec", "load_spec", "run_experiment"]
