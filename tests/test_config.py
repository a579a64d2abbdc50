"""Run config: YAML loading, --set overrides, one error naming every bad field, secrets never saved."""

import re
from pathlib import Path

import pytest
import yaml

from cpt.config import ConfigError, apply_overrides, load_config, save_config

GOOD = {
    "run": {"name": "t", "output_dir": "runs/t"},
    "model": {"tokenizer": "tok", "arch": {"model_type": "llama", "hidden_size": 64}},
    "data": {"seq_len": 64, "sources": [{"name": "a", "path": "data/a"}, {"name": "b", "path": "data/b", "replay": True}],
             "heldout": [{"name": "a", "path": "data/a/heldout", "tag": "upstream"}]},
    "stages": [{"name": "s1", "steps": 10, "mix": {"a": 0.95, "b": 0.05}}],
    "train": {"global_batch_size": 8, "micro_batch_size": 4},
}


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_good_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.data.sources[1].replay is True
    assert cfg.stages[0].schedule.type == "cosine"
    assert cfg.total_steps == 10
    assert cfg.optim.weight_decay == 0.1


def test_overrides_types_and_list_indices(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.global_batch_size=16", "stages.0.steps=25",
                                               "stages.0.schedule.max_lr=3e-4", "logging.wandb.enabled=true",
                                               "logging.wandb.tags=[a, b]"])
    assert cfg.train.global_batch_size == 16
    assert cfg.stages[0].steps == 25
    assert cfg.stages[0].schedule.max_lr == pytest.approx(3e-4)
    assert cfg.logging.wandb.enabled is True and cfg.logging.wandb.tags == ["a", "b"]


def test_every_bad_field_named_in_one_error(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(GOOD))
    bad["train"]["global_batch_size"] = -1
    bad["train"]["precison"] = "bf16"  # typo
    bad["data"]["seq_len"] = 0
    bad["stages"][0]["steps"] = 0
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, bad))
    msg = str(e.value)
    for field in ("train.global_batch_size", "train.precison", "data.seq_len", "stages.0.steps"):
        assert field in msg, msg
    assert "unknown field" in msg
    assert msg.startswith("invalid config (4 problems)")


def test_a_misspelt_field_names_the_fields_it_may_mean(tmp_path):
    """A typo (YAML or --set, at any depth, in list items too) names the close field names of its section."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD), ["trian.log_every=5", "train.global_batchsize=4", "data.sources.0.nmae=x",
                                            "logging.wandb.entiy=me", "train.xyzzy=1"])
    msg = str(e.value)
    for line in ("  - trian: unknown field (did you mean train?)",
                 "  - train.global_batchsize: unknown field (did you mean global_batch_size or micro_batch_size?)",
                 "  - data.sources.0.nmae: unknown field (did you mean name?)",
                 "  - logging.wandb.entiy: unknown field (did you mean entity?)",
                 "  - train.xyzzy: unknown field (check the spelling)"):
        assert line in msg.splitlines(), msg


def test_cross_field_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.0.mix: unknown sources \['c'\]") as e:
        load_config(write(tmp_path, GOOD), ["stages.0.mix={a: 0.5, c: 0.5}"])
    assert str(e.value).splitlines()[1].startswith("  - stages.0.mix: ")  # no "<root>: " before the field it names
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        load_config(write(tmp_path, GOOD), ["train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="duplicate names"):
        load_config(write(tmp_path, GOOD), ["data.sources.1.name=a"])
    with pytest.raises(ConfigError, match="model.tokenizer is required"):
        load_config(write(tmp_path, GOOD), ["model.tokenizer=null"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, GOOD), ["train.global_batch_size"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(write(tmp_path, GOOD), ["stages.5.steps=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_environment_variables_in_values(tmp_path, monkeypatch):
    """`${VAR}` in a YAML value or a --set value is the environment variable (a batch job's $SCRATCH); an unset one
    is one error naming the field. It used to be kept literally: a run directory named `${SCRATCH}/runs/t`."""
    monkeypatch.setenv("CPT_TEST_SCRATCH", "/scratch/me")
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["run"]["output_dir"] = "${CPT_TEST_SCRATCH}/runs/t"
    data["data"]["sources"][0]["path"] = "x/${CPT_TEST_SCRATCH}"
    data["run"]["name"] = "$HOME-${CPT_TEST_SCRATCH}"  # only ${...} is expanded (a bare $VAR in a path: next test)
    cfg = load_config(write(tmp_path, data), ["logging.wandb.group=${CPT_TEST_SCRATCH}"])
    assert cfg.run.output_dir == "/scratch/me/runs/t" and cfg.run.name == "$HOME-/scratch/me"
    assert cfg.data.sources[0].path == "x//scratch/me" and cfg.logging.wandb.group == "/scratch/me"
    monkeypatch.delenv("CPT_TEST_SCRATCH")
    with pytest.raises(ConfigError, match=r"^data.sources.0.path: environment variable CPT_TEST_SCRATCH is not set"):
        load_config(write(tmp_path, data))
    # in the flow style of the README's examples an unquoted ${VAR} is a YAML error: the line says to quote it
    (tmp_path / "flow.yaml").write_text("run: {name: x, output_dir: ${CPT_TEST_SCRATCH}/runs/x}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: line 1, .*; a \$\{VAR\} value inside \{ \} or \[ \] must be "
                                          r"quoted, e.g. \{output_dir: \"\$\{SCRATCH\}/runs/x\"\}$"):
        load_config(tmp_path / "flow.yaml")


def test_numbers_without_a_dot_are_numbers_in_free_form_sections_too(tmp_path):
    """`1e-5` and `5e5` (YAML 1.2 floats) were strings to PyYAML: typed fields converted them, but model.arch and
    model.config_overrides handed the strings to the model's config, which then failed to build or run."""
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data).replace("hidden_size: 64", "hidden_size: 64\n    rms_norm_eps: 1e-5")
                 + "optim: {weight_decay: 1e-2}\n")
    cfg = load_config(p, ["model.config_overrides={rope_theta: 5e5}", "model.arch.initializer_range=2E-2",
                          "stages.0.schedule.max_lr=3e-4"])
    assert cfg.model.arch["rms_norm_eps"] == 1e-5 and cfg.model.config_overrides["rope_theta"] == 5e5
    assert cfg.model.arch["initializer_range"] == 0.02 and cfg.optim.weight_decay == 0.01
    assert cfg.stages[0].schedule.max_lr == 3e-4 and cfg.run.name == "t"


def test_a_number_for_a_text_field_is_its_text(tmp_path):
    """`run: {name: 2024}` and `--set run.name=2024` (YAML reads a number) were 'Input should be a valid string'
    unless quoted; a numeric output_dir, stage name, wandb group or revision likewise. Taken as text; numeric
    fields, and numbers in free-form sections, stay numbers."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(GOOD).replace("name: t\n", "name: 2024\n").replace("name: s1", "name: 1"))
    cfg = load_config(p)
    assert cfg.run.name == "2024" and cfg.stages[0].name == "1"
    cfg = load_config(write(tmp_path, GOOD), ["run.name=2025", "run.output_dir=7", "logging.wandb.group=3",
                                              "model.revision=1234567", "model.arch.hidden_size=32"])
    assert (cfg.run.name, cfg.run.output_dir, cfg.logging.wandb.group, cfg.model.revision) == ("2025", "7", "3", "1234567")
    assert cfg.model.arch["hidden_size"] == 32 and cfg.train.global_batch_size == 8
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(write(tmp_path, GOOD), ["train.global_batch_size=eight"])


def test_a_decimal_number_for_a_text_field_is_an_error(tmp_path):
    """`revision: 1.10` (a tag) was taken as "1.1", the text of the float YAML read: another revision, silently.
    A decimal number for a text field (or in a list of texts) is an error asking for quotes; number fields and
    unions with a number (warmup_from) still take decimals, and a quoted one is the text."""
    for override, field in (("model.revision=1.10", "model.revision"), ("run.name=2.0", "run.name"),
                            ("model.lora={target_modules: [q_proj, 1.5]}", "model.lora.target_modules")):
        with pytest.raises(ConfigError, match=rf"{field}: 1.1 |{field}: 2.0 |{field}: 1.5 "):
            load_config(write(tmp_path, GOOD), [override])
    cfg = load_config(write(tmp_path, GOOD), ["model.revision='1.10'", "stages.0.schedule.max_lr=0.5"])
    assert cfg.model.revision == "1.10" and cfg.stages[0].schedule.max_lr == 0.5


def test_a_key_given_twice_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section silently dropped the first's fields (the
    global batch size back to its default). Anchors and merge keys (configs/schedules/infinite.yaml) still work."""
    text = yaml.safe_dump(GOOD) + "train:\n  log_every: 5\n"
    (tmp_path / "twice.yaml").write_text(text)
    line = text.splitlines().index("train:") + 1
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "twice.yaml")
    assert str(e.value) == f"{tmp_path / 'twice.yaml'}: not valid YAML: line {line + 3}, column 1: duplicate key " \
        f"'train' (first on line {line})"  # one line
    (tmp_path / "latin1.yaml").write_bytes("# café\nrun: {name: x}\n".encode("latin-1"))  # was a traceback
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 5\): save it as UTF-8$"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "bad.yaml").write_text("run: {name: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: line 2, column 1: while parsing a flow mapping "
                                          r"expected ',' or '}', but got '<stream end>'$"):
        load_config(tmp_path / "bad.yaml")
    shipped = load_config(Path(__file__).parents[1] / "configs" / "schedules" / "infinite.yaml")
    trunk, later = shipped.stages[0].schedule, shipped.stages[1].schedule  # `<<: *trunk`, then its own keys
    assert later.continue_trunk and later.constant_lr == trunk.constant_lr and later.max_lr == trunk.max_lr


def test_apply_overrides_creates_sections():
    out = apply_overrides({}, ["logging.wandb.project=x"])
    assert out == {"logging": {"wandb": {"project": "x"}}}


def test_saved_config_round_trips_and_redacts_secrets(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    from cpt.config import redact

    assert redact({"wandb": {"api_key": "SECRET", "project": "p"}, "hub_token": "x"}) == {
        "wandb": {"api_key": "<redacted>", "project": "p"}, "hub_token": "<redacted>"}


def test_every_shipped_run_config_validates():
    """configs/*.yaml, configs/schedules/ and configs/real/ are run configs: they must load as they ship."""
    from pathlib import Path

    from cpt.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted([*root.glob("*.yaml"), *(root / "schedules").glob("*.yaml"), *(root / "real").glob("*.yaml")])
    assert len(paths) >= 7, paths
    for p in paths:
        cfg = load_config(p)
        assert cfg.stages and cfg.data.sources, p


def test_a_union_field_gets_one_problem_line(tmp_path):
    """train.profile.ranks is a list or 'all': a bad value was two lines (one per member of the union)."""
    for bad in ("some", "3"):
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, GOOD), [f"train.profile.ranks={bad}"])
        assert str(e.value).splitlines()[0] == "invalid config (1 problem):"
        assert "train.profile.ranks: a list of process indices (e.g. [0, 3]) or 'all'" in str(e.value)
    with pytest.raises(ConfigError, match=r"train.profile.ranks: an empty list profiles no process"):  # (silently)
        load_config(write(tmp_path, GOOD), ["train.profile.ranks=[]"])
    assert load_config(write(tmp_path, GOOD), ["train.profile.ranks=all"]).train.profile.ranks == "all"
    assert load_config(write(tmp_path, GOOD), ["train.profile.ranks=[0, 1]"]).train.profile.ranks == [0, 1]
    # any union: one line naming the field, its types joined (pydantic gives one error per member it tried)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD), ["model.lora={r: 4, target_modules: {q: 1}}", "train.chunked_loss=maybe"])
    assert str(e.value).splitlines() == [
        "invalid config (2 problems):",
        "  - model.lora.target_modules: Input should be a valid string or a valid list",
        "  - train.chunked_loss: Input should be a valid boolean, unable to interpret input or 'auto'"]
    # a constrained member (Annotated[float, Field(ge=0)] | 'previous') is named by pydantic "constrained-float": it was
    # a second line "stages.0.schedule.warmup_from.constrained-float: ..." under "2 problems"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD), ["stages.0.schedule.warmup_from=-1"])
    assert str(e.value).splitlines() == [
        "invalid config (1 problem):",
        "  - stages.0.schedule.warmup_from: Input should be greater than or equal to 0 or 'previous'"]


def test_a_check_finding_several_problems_gives_one_line_and_count_each(tmp_path):
    """The cross-section checks and a schedule's checks collect their problems: they were one line joined by '; '
    under 'invalid config (1 problem):' (two stages too short for their warmup, an infinite schedule's LRs)."""
    two = [{"name": f"s{i}", "steps": 2, "mix": {"a": 1.0}, "schedule": {"type": "cosine", "max_lr": 1e-3,
                                                                       "warmup_steps": 2}} for i in (1, 2)]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {**GOOD, "stages": two}), ["train.micro_batch_size=3"])
    assert str(e.value).splitlines() == [
        "invalid config (3 problems):",
        "  - train.global_batch_size (8) must be a multiple of train.micro_batch_size (3)",
        "  - stages.0.schedule.warmup_steps: 2 leaves no decay step in a stage of 2 steps (must be < 2)",
        "  - stages.1.schedule.warmup_steps: 2 leaves no decay step in a stage of 2 steps (must be < 2)"]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD), ["stages.0.schedule={type: infinite, max_lr: 1.0e-3, constant_lr: 2.0e-3, "
                                            "min_lr: 1.0e-2, cooldown_steps: 0}"])
    assert str(e.value).splitlines() == [
        "invalid config (3 problems):",
        "  - stages.0.schedule: min_lr (0.01) must not exceed max_lr (0.001)",
        "  - stages.0.schedule: constant_lr (0.002) must not exceed max_lr (0.001)",
        "  - stages.0.schedule: min_lr (0.01) must not exceed constant_lr (0.002)"]


def test_a_regex_in_lora_target_modules_says_regexes_are_not_accepted(tmp_path):
    """peft takes a string target_modules as a regex; cpt checks names against the model, so a regex failed as 'match
    no module' after the model loaded, without saying regexes are unsupported or what is accepted."""
    for bad in (r"'.*\.(q_proj|v_proj)'", r"['q_proj', 'layers\.0\..*']"):
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, GOOD), [f"model.lora={{r: 4, target_modules: {bad}}}"])
        msg = str(e.value)
        assert "look like regular expressions, which cpt does not accept" in msg and "'all-linear'" in msg, msg
        assert "q_proj" in msg and len(msg.splitlines()) == 2  # "invalid config (1 problem):" and the field's line
    for good in ("all-linear", "q_proj", "[q_proj, self_attn.v_proj]"):
        assert load_config(write(tmp_path, GOOD), [f"model.lora={{r: 4, target_modules: {good}}}"]).model.lora


def test_hf_options_on_a_shards_source_are_one_line(tmp_path):
    """`revision`, `split`, `text_field`... on a `type: shards` source were ignored silently (a shard directory is read
    as `cpt prepare` wrote it): a user pinning a commit or another split trained on something else."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD), ["data.sources.0.revision=abc123", "data.sources.0.split=validation"])
    msg = str(e.value)
    assert "data.sources.0: revision, split: only for a source of type: hf" in msg and "type: shards" in msg, msg
    assert load_config(write(tmp_path, GOOD), ["data.sources.0.type=hf", "data.sources.0.revision=abc123"])
    saved = tmp_path / "saved.yaml"  # a saved config.yaml (every field written) loads again
    from cpt.config.run import save_config
    save_config(load_config(write(tmp_path, GOOD)), saved)
    assert load_config(saved).data.sources[0].split == "train"


PATH_FIELDS = ("run.output_dir", "model.tokenizer", "model.name_or_path", "data.sources.a.path", "data.heldout.a.path",
               "train.init_from", "eval.lm_eval.include_path", "model.vocab.add_tokens_file")


def test_path_fields_expand_home_and_refuse_a_bare_variable(tmp_path, monkeypatch):
    """A leading `~` in a path field is the home folder: `output_dir: ~/runs/t` made a folder named `~` in the working
    directory (while W&B, expanding it, wrote under the real home), and `$SCRATCH/runs/t` a folder named `$SCRATCH`.
    A bare `$VAR` is not expanded (only `${VAR}` is): in a path it is one error asking for the braces."""
    monkeypatch.setenv("HOME", "/home/me")
    cfg = load_config(write(tmp_path, GOOD), [f"{f}=~/{f}" for f in PATH_FIELDS])
    got = [cfg.run.output_dir, cfg.model.tokenizer, cfg.model.name_or_path, cfg.data.sources[0].path,
           cfg.data.heldout[0].path, cfg.train.init_from, cfg.eval.lm_eval.include_path, cfg.model.vocab.add_tokens_file]
    assert got == [f"/home/me/{f}" for f in PATH_FIELDS]
    assert load_config(write(tmp_path, GOOD), ["run.name=~x"]).run.name == "~x"  # a name is no path
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD), ["run.output_dir=$SCRATCH/runs/t", "data.sources.1.path=/d/$V2"])
    assert str(e.value).splitlines()[1:] == [
        "  - run.output_dir: '$SCRATCH/runs/t': cpt expands ${VAR}, not $SCRATCH: write ${SCRATCH}",
        "  - data.sources.1.path: '/d/$V2': cpt expands ${VAR}, not $V2: write ${V2}"]
    # a shell default (or any other ${...} form) was kept as written, in any field: one error naming the field
    with pytest.raises(ConfigError, match=r"^run.output_dir: '\$\{SCRATCH:-/tmp\}' in '\$\{SCRATCH:-/tmp\}/runs': cpt "
                                          r"expands \$\{VAR\} alone \(no defaults or other shell forms\)"):
        load_config(write(tmp_path, GOOD), ["run.output_dir=${SCRATCH:-/tmp}/runs"])


def test_overrides_address_list_items_by_name(tmp_path):
    """`--set data.sources.b.path=...` (a source by its name, as `stages.0.mix.b` already was) was 'not a valid index';
    `--set =3` was an 'unknown field' naming no field."""
    cfg = load_config(write(tmp_path, GOOD), ["data.sources.b.path=/scratch/b", "data.heldout.a.max_tokens=100",
                                              "stages.s1.steps=7", "data.sources.0.replay=true"])
    assert [s.path for s in cfg.data.sources] == ["data/a", "/scratch/b"] and cfg.data.sources[0].replay
    assert cfg.data.heldout[0].max_tokens == 100 and cfg.stages[0].steps == 7
    with pytest.raises(ConfigError, match=r"^override 'data.sources.c.path': 'c' is not an index into a list of 2 "
                                          r"or a name \(a, b\)$"):
        load_config(write(tmp_path, GOOD), ["data.sources.c.path=x"])
    for bad in ("=3", "train..log_every=3"):
        with pytest.raises(ConfigError, match="empty field name"):
            load_config(write(tmp_path, GOOD), [bad])


def test_a_folder_for_the_config_and_python_none_are_named(tmp_path):
    """`cpt train runs/x` (the run directory, not its config.yaml) said 'config file not found' of a folder that is
    there; `--set eval.every=None` said only 'Input should be a valid integer' (YAML reads None as text)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=rf"^{run} is a folder, not a config file: a run directory's resolved config "
                                          rf"is {run / 'config.yaml'}$"):
        load_config(run)
    with pytest.raises(ConfigError, match=r"eval.every: Input should be a valid integer, .* \('None' is text in YAML: "
                                          r"write null for no value\)$"):
        load_config(write(tmp_path, GOOD), ["eval.every=None"])


def test_an_override_changes_only_the_place_it_names_even_through_a_yaml_alias(tmp_path):
    """A YAML alias (`schedule: *sched` in two stages, or a `<<:` merge's nested sections) loads as one shared node:
    `--set stages.b.schedule.max_lr=...` changed stage a too (copy.deepcopy keeps sharing)."""
    text = yaml.safe_dump({k: v for k, v in GOOD.items() if k != "stages"}) + """
sched: &sched {type: cosine, max_lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 2}
stages:
  - {name: a, steps: 10, mix: &mix {a: 0.9, b: 0.1}, schedule: *sched}
  - {name: b, steps: 10, mix: *mix, schedule: *sched}
"""
    p = tmp_path / "alias.yaml"
    p.write_text(text.replace("sched: &sched", "x-sched: &sched"))
    with pytest.raises(ConfigError, match="x-sched"):  # (an unknown top-level key still is one)
        load_config(p)
    raw = yaml.safe_load(text)
    raw.pop("sched")
    out = apply_overrides(raw, ["stages.b.schedule.max_lr=5e-3", "stages.0.mix.a=0.5"])
    assert [s["schedule"]["max_lr"] for s in out["stages"]] == [1e-3, 5e-3]
    assert [s["mix"]["a"] for s in out["stages"]] == [0.5, 0.9]
    assert raw["stages"][0]["schedule"] is raw["stages"][1]["schedule"]  # (the input is left as it was)


def test_an_override_value_that_is_not_yaml_is_an_error_saying_how_to_quote_it():
    for item, said in (("stages.0.mix={a: 3, a: 1}", "duplicate key 'a'"), ("stages.0.mix={a: 3, b: 1", "flow mapping"),
                       ("run.name=[oops", "flow sequence"), ("run.name=@x", "cannot start any token")):
        with pytest.raises(ConfigError) as e:
            apply_overrides(GOOD, [item])
        assert str(e.value).startswith(f"override {item!r}: the value is not valid YAML (") and said in str(e.value)
        assert str(e.value).endswith(f"""quote it: {item.split('=')[0]}='"{item.split('=', 1)[1]}"'""")
    assert apply_overrides(GOOD, ['run.name="[oops"'])["run"]["name"] == "[oops"


def test_stage_names_given_twice_are_an_error(tmp_path):
    two = {**GOOD, "stages": [GOOD["stages"][0], {**GOOD["stages"][0], "steps": 4}]}
    with pytest.raises(ConfigError, match=r"stages: duplicate names \['s1'\]"):
        load_config(write(tmp_path, two))
    with pytest.raises(ConfigError, match=r"'stages.s1.steps': 2 items of the list are named 's1': address one by its index \(0, 1\)"):
        apply_overrides(two, ["stages.s1.steps=9"])
    unnamed = [{k: v for k, v in GOOD["stages"][0].items() if k != "name"}] * 2  # (both "stage": as before)
    assert [s.name for s in load_config(write(tmp_path, {**GOOD, "stages": unnamed})).stages] == ["stage", "stage"]


@pytest.mark.parametrize("item, said", [
    ("optim.betas=[0.9, 1.5]", "optim.betas.1: Input should be less than 1"),
    ("optim.eps=-1", "optim.eps: Input should be greater than or equal to 0"),
    ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
    ("run.seed=99999999999", "run.seed: Input should be less than or equal to 4294967295"),
    ("eval.sample_seed=-3", "eval.sample_seed: Input should be greater than or equal to 0"),
    ("data.seq_len=1", "data.seq_len: Input should be greater than or equal to 2"),
    ("train.peak_flops=0", "train.peak_flops: Input should be greater than 0"),
    ("run.output_dir=''", "run.output_dir: an empty path"),
    ("checkpoint.keep=true", "checkpoint.keep: true is not a number"),  # (pydantic took true as 1)
    ("train.z_loss=.inf", "train.z_loss: Input should be a finite number"),  # (passed ge=0; every step non-finite)
    ("train.router_aux_loss_coef=.nan", "train.router_aux_loss_coef: Input should be a finite number"),
    ("checkpoint.max_shard_size=true", "checkpoint.max_shard_size: true is not a number"),
])
def test_values_torch_or_numpy_would_refuse_at_start_are_config_errors(tmp_path, item, said):
    """Each passed validation and --dry-run, then failed at start with a traceback (numpy's seed, AdamW's betas and
    eps, the held-out evaluation's 2 positions) or logged nonsense (MFU -2.4e11%)."""
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(write(tmp_path, GOOD), [item])
