"""cpt/pickle_scan.py: the pickles torch.distributed.checkpoint (FSDP2 checkpoints) and DeepSpeed read unrestricted are
checked first, without running them. DCP checkpoints written here on one process (dcp.save, no process group); the
ZeRO files of a real run: tests/test_async_deepspeed_saves.py."""

import argparse
import pickle

import pytest
import torch

from cpt.pickle_scan import PickleCheckError, check_checkpoint_pickles, read_dcp_metadata


class _Hostile:
    """What a hostile pickle does: run code when unpickled (here: write a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _dcp(folder, extra=None):
    """A DCP folder like FSDP2's optimizer_0: tensors and non-tensor values (stored as torch.save'd bytes)."""
    import torch.distributed.checkpoint as dcp

    state = {"optimizer": {"state": {"w": {"exp_avg": torch.ones(4), "step": torch.tensor(3.0)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "param_names": ["w"]}], **(extra or {})}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_a_dcp_checkpoint_as_written_passes_and_reads_as_dcp_reads_it(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = _dcp(tmp_path / "ckpt" / "optimizer_0")
    ours = read_dcp_metadata(folder)
    theirs = dcp.FileSystemReader(str(folder)).read_metadata()
    assert ours.state_dict_metadata.keys() == theirs.state_dict_metadata.keys()
    assert any(type(m).__name__ == "BytesStorageMetadata" for m in ours.state_dict_metadata.values())  # (scanned)
    check_checkpoint_pickles(tmp_path / "ckpt")


def test_a_metadata_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = _dcp(tmp_path / "ckpt" / "pytorch_model_fsdp_0")
    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    marker = tmp_path / "ran"
    meta.planner_data = {"x": _Hostile(marker)}
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(PickleCheckError, match=r"pytorch_model_fsdp_0/\.metadata: refusing to unpickle it: it names builtins\.exec"):
        check_checkpoint_pickles(tmp_path / "ckpt")
    assert not marker.exists()
    dcp.FileSystemReader(str(folder)).read_metadata()  # what DCP itself would have done
    assert marker.read_text() == "ran"


def test_a_stored_value_naming_another_global_is_refused(tmp_path):
    folder = _dcp(tmp_path / "ckpt" / "optimizer_0", extra={"extra": argparse.Namespace(x=1)})
    with pytest.raises(PickleCheckError, match=r"__0_0\.distcp \(optimizer\.extra\): refusing to unpickle it: it names "
                                               r"argparse\.Namespace"):
        read_dcp_metadata(folder)


def test_damaged_files_are_one_line_not_a_traceback(tmp_path):
    folder = _dcp(tmp_path / "ckpt" / "optimizer_0")
    data = folder / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:40])
    with pytest.raises(PickleCheckError, match=r"__0_0\.distcp.*cannot read it to check it before unpickling"):
        read_dcp_metadata(folder)
    (folder / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(PickleCheckError, match=r"\.metadata: cannot read it to check it before unpickling"):
        read_dcp_metadata(folder)
    zero = tmp_path / "z" / "pytorch_model"
    zero.mkdir(parents=True)
    (zero / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PickleCheckError, match="optim_states.pt: cannot read it to check it before unpickling"):
        check_checkpoint_pickles(tmp_path / "z")


def test_a_zero_file_naming_another_global_is_refused(tmp_path):
    zero = tmp_path / "ckpt" / "pytorch_model"
    zero.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.18"}, zero / "mp_rank_00_model_states.pt")
    check_checkpoint_pickles(tmp_path / "ckpt")
    torch.save({"optimizer_state_dict": {"x": argparse.Namespace()}}, zero / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(PickleCheckError, match="optim_states.pt: refusing to unpickle it: it names argparse.Namespace"):
        check_checkpoint_pickles(tmp_path / "ckpt")


def test_cpt_export_and_portable_loads_read_dcp_folders_through_the_check(tmp_path):
    """cpt/consolidate.py's DCP reader (cpt export, a resume on another world size or backend): the clean folder
    reads; a stored value naming another global is a ConsolidateError (`cpt export`, `cpt train` print one line)."""
    from cpt.consolidate import ConsolidateError, _dcp_read

    assert torch.equal(_dcp_read(_dcp(tmp_path / "a"))["optimizer"]["state"]["w"]["exp_avg"], torch.ones(4))
    with pytest.raises(ConsolidateError, match="refusing to unpickle it: it names argparse.Namespace"):
        _dcp_read(_dcp(tmp_path / "b", extra={"extra": argparse.Namespace(x=1)}))


def test_accelerates_own_files_are_checked_before_a_resume(tiny_cpt_data, tmp_path, capsys):
    """accelerate reads its files with weights_only=True, which refuses a hostile one, but a tampered
    ``optimizer.bin`` (its CHECKSUMS.json rewritten to match) ended the resume in a traceback from inside
    ``load_state``, and a tampered ``random_states_0.pkl`` was skipped silently (logged at INFO level): the resume went on
    with another RNG state. Both are one line naming the file, before accelerate reads anything; the code never runs."""
    import json
    import os
    import shutil

    import yaml

    from conftest import tiny_run_config
    from cpt.cli import main
    from cpt.fileio import file_digest

    trained = tmp_path / "trained"
    cfg = tiny_run_config(tiny_cpt_data, trained, checkpoint={"every": 2}, eval={"at_start": False, "every": 100})
    cfg["stages"][0]["steps"] = 4
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    marker = tmp_path / "ran"
    for name in ("optimizer.bin", "random_states_0.pkl"):
        out = tmp_path / "run"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(trained, out)
        cfg["run"]["output_dir"] = str(out)
        (tmp_path / "copy.yaml").write_text(yaml.safe_dump(cfg))
        for ckpt in (out / "checkpoints").iterdir():
            torch.save({"state": _Hostile(marker)}, ckpt / name)
            sums = json.loads((ckpt / "CHECKSUMS.json").read_text())
            sums["files"] = {n: {"size": os.path.getsize(ckpt / n), "digest": file_digest(ckpt / n)} for n in sums["files"]}
            (ckpt / "CHECKSUMS.json").write_text(json.dumps(sums))
        capsys.readouterr()
        assert main(["train", str(tmp_path / "copy.yaml"), "--resume", "--allow-config-change",
                     "--set", "stages.0.steps=6"]) == 1, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"{name}: refusing to unpickle it: it names builtins.exec" in err, err[-3000:]
        assert not marker.exists()
