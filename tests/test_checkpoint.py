import json

import pytest
import torch
from helpers import inputs_for, make, plant_zeros

from edgeshift.core.errors import InputFileError
from edgeshift.pruner.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from edgeshift.pruner.structured import prune_zero_channels


def test_round_trip_keeps_outputs_masks_and_meta(tmp_path):
    model = make("resnet20", {}, 32)
    masks = {"conv1.weight": model.conv1.weight != 0}
    save_checkpoint(model, tmp_path / "m.pt", masks=masks, meta={"level": 3})
    loaded, payload = load_checkpoint(tmp_path / "m.pt")
    x = inputs_for(32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert payload["meta"] == {"level": 3}
    assert torch.equal(payload["masks"]["conv1.weight"], masks["conv1.weight"])


def test_tensors_that_do_not_match_the_architecture_are_refused(tmp_path):
    model = make("vgg11", {}, 32)
    plant_zeros(model)
    pruned, _ = prune_zero_channels(model, inputs_for(32))
    save_checkpoint(pruned, tmp_path / "p.pt")
    payload = torch.load(tmp_path / "p.pt", weights_only=True)
    payload["arch"]["layers"]["fc"]["in"] += 1  # widths recorded no longer match the tensors
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(InputFileError, match="do not match architecture 'vgg11'"):
        load_checkpoint(tmp_path / "bad.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_never_executed(tmp_path, capsys):
    torch.save({"format": "edgeshift-checkpoint", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputFileError, match="not a readable edgeshift checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(InputFileError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(InputFileError, match="not an edgeshift checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(InputFileError, match="not a readable"):
        read_checkpoint(tmp_path / "text.pt")


def test_the_checkpoint_runner_writes_nothing_unless_the_step_succeeds_and_records_the_source(tmp_path):
    from edgeshift.pruner.checkpoint import read_checkpoint
    from edgeshift.pruner.models.sources import ModelSpec
    from edgeshift.pruner.runner import CheckpointJob, Outcome, run_checkpoint

    class Report:
        def to_dict(self):
            return {"answer": 42}

    job = CheckpointJob(None, ModelSpec("resnet20"), tmp_path / "out.pt", tmp_path / "out.json")

    def failing(model, payload):
        raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError):
        run_checkpoint(job, failing)
    assert list(tmp_path.iterdir()) == []

    outcome = run_checkpoint(job, lambda model, payload: Outcome(model, Report(), {"kept": True}))
    meta = read_checkpoint(tmp_path / "out.pt")["meta"]
    assert meta == {"kept": True, "pruned_from": "resnet20"} and outcome.meta == meta
    assert json.loads((tmp_path / "out.json").read_text()) == {"answer": 42}
