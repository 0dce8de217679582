"""engine/checkpoint.py: weights_only round trips, RNG states, atomic writes, clear mismatch errors."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from engine import checkpoint as ckpt


def tiny_model(out_features: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, out_features))


def tiny_training(model: nn.Module):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / 10))
    for _ in range(3):
        loss = model(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def save(path, model, optimizer, scheduler, *, iteration=3, teacher=None, keep=0, num_classes=3):
    return ckpt.save_checkpoint(path, iteration=iteration, config={"detector": "fcos", "lr": 0.1},
                                meta={"detector": "fcos", "num_classes": num_classes, "class_names": ["a", "b", "c"],
                                      "category_ids": [1, 2, 3]},
                                model=model, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                                extra={"sampler": torch.tensor([1, 2])}, keep=keep)


def test_round_trip_with_weights_only(tmp_path):
    model = tiny_model()
    teacher = tiny_model()
    optimizer, scheduler = tiny_training(model)
    path = save(tmp_path / "run" / "checkpoint_0000003.pth", model, optimizer, scheduler, teacher=teacher)

    state = torch.load(path, weights_only=True)  # must not need any unsafe global
    assert state["iteration"] == 3 and state["config"]["lr"] == 0.1 and state["meta"]["num_classes"] == 3
    assert ckpt.last_checkpoint(tmp_path / "run") == path
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["iteration"] == 3  # the link loads too

    state = ckpt.load_checkpoint(path)
    model2, teacher2 = tiny_model(), tiny_model()
    for p in model2.parameters():
        p.data.zero_()
    optimizer2, scheduler2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), None
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda it: min(1.0, (it + 1) / 10))
    ckpt.load_model_state(model2, state["model"], path=path)
    ckpt.load_model_state(teacher2, state["teacher"], path=path, what="teacher")
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])

    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert scheduler2.last_epoch == scheduler.last_epoch
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    momentum, momentum2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert all(torch.equal(momentum[k]["momentum_buffer"], momentum2[k]["momentum_buffer"]) for k in momentum)
    assert torch.equal(state["extra"]["sampler"], torch.tensor([1, 2]))


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.randn(())  # move away from the seeded states
    torch.save({"rng": ckpt.capture_rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.randn(3), torch.randn(3))

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert random.random() == expected[0]
    assert np.array_equal(np.random.randn(3), expected[1])
    assert torch.equal(torch.randn(3), expected[2])


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt.atomic_save({"version": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_keep_removes_older_periodic_checkpoints(tmp_path):
    model = tiny_model()
    optimizer, scheduler = tiny_training(model)
    for iteration in (10, 20, 30):
        save(tmp_path / ckpt.checkpoint_name(iteration), model, optimizer, scheduler, iteration=iteration, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [ckpt.checkpoint_name(20), ckpt.checkpoint_name(30)]
    assert ckpt.last_checkpoint(tmp_path).name == ckpt.checkpoint_name(30)
    assert ckpt.last_checkpoint(tmp_path / "nothing_here") is None


def test_mismatches_name_the_file(tmp_path):
    model = tiny_model(out_features=3)
    optimizer, scheduler = tiny_training(model)
    path = save(tmp_path / "c.pth", model, optimizer, scheduler)
    state = ckpt.load_checkpoint(path)

    with pytest.raises(ValueError, match=r"c\.pth.*3 classes.*5"):
        ckpt.check_compatible(state, path=path, detector="fcos", num_classes=5)
    with pytest.raises(ValueError, match=r"c\.pth.*'fcos'.*'retinanet'"):
        ckpt.check_compatible(state, path=path, detector="retinanet", num_classes=3)
    ckpt.check_compatible(state, path=path, detector="fcos", num_classes=3)
    with pytest.raises(ValueError, match=r"c\.pth(.|\n)*3\.weight: checkpoint \(3, 8\) vs model \(5, 8\)"):
        ckpt.load_model_state(tiny_model(out_features=5), state["model"], path=path)


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pth"):
        ckpt.load_checkpoint(tmp_path / "junk.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth is not a checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pth")
