"""TrainState: the one record of where a run stands. Its state_dict round-trips, the shape
older checkpoints used ('partial') reads as the same state, and under DDP the saved running
sums go to rank 0 once while every rank keeps its share of the images seen."""

from __future__ import annotations

import pytest
import torch

from localitylab.errors import UserError
from localitylab.train.distributed import Distributed
from localitylab.train.state import TrainState

ROW = {"epoch": 1, "step": 10, "train_loss": 2.0}


def stopped_mid_epoch() -> TrainState:
    state = TrainState(epoch=1, step=10, history=[ROW])
    state.start_epoch()
    for loss, correct in ((2.5, 3), (1.5, 5)):
        state.step += 1
        state.add(torch.tensor(loss), torch.tensor(correct), 4)
    return state


def test_state_dict_round_trips_mid_epoch():
    saved = stopped_mid_epoch().state_dict()
    assert saved["epoch"] == 1 and saved["step"] == 12 and saved["metrics"] == ROW
    progress = saved["epoch_progress"]
    assert progress["batch"] == 2 and progress["seen"] == 8 and int(progress["correct"]) == 8
    assert float(progress["loss_sum"]) == 2.5 * 4 + 1.5 * 4
    again = TrainState()
    again.load_state_dict(saved)
    assert (again.epoch, again.batch, again.step, again.seen, again.history) == (1, 2, 12, 8, [ROW])
    assert torch.equal(again.loss_sum, stopped_mid_epoch().loss_sum) and int(again.correct) == 8
    assert again.where() == "epoch 2, batch 3"


def test_the_old_partial_shape_reads_as_the_same_state():
    new = stopped_mid_epoch().state_dict()
    progress = new.pop("epoch_progress")
    old = {**new, "partial": {"epoch": 2, **progress}}  # format 1 named the epoch in progress
    a, b = TrainState(), TrainState()
    a.load_state_dict(new | {"epoch_progress": progress})
    b.load_state_dict(old)
    assert (a.epoch, a.batch, a.step, a.seen, a.elapsed_before) == (b.epoch, b.batch, b.step, b.seen, b.elapsed_before)
    assert torch.equal(a.loss_sum, b.loss_sum) and torch.equal(a.correct, b.correct)
    with pytest.raises(UserError, match="cannot resume"):
        TrainState().load_state_dict({**old, "partial": {**old["partial"], "epoch": 5}})


def test_an_end_of_epoch_state_has_no_progress_and_finishing_resets_the_sums():
    state = stopped_mid_epoch()
    row = state.finish_epoch(Distributed(), reports_accuracy=True)
    assert row["epoch"] == 2 and row["train_loss"] == 2.0 and row["train_acc"] == 1.0
    assert (state.epoch, state.batch, state.seen, float(state.loss_sum), int(state.correct)) == (2, 0, 0, 0.0, 0)
    assert state.state_dict()["epoch_progress"] is None


@pytest.mark.parametrize("rank", [0, 1])
def test_under_ddp_rank_0_carries_the_saved_sums_and_every_rank_its_share_of_images(rank):
    saved = stopped_mid_epoch().state_dict()  # sums over both ranks, as saved
    state = TrainState()
    state.load_state_dict(saved, Distributed(rank=rank, world_size=2))
    assert state.seen == 4 and state.batch == 2
    expected = (saved["epoch_progress"]["loss_sum"], saved["epoch_progress"]["correct"]) if rank == 0 else (0.0, 0)
    assert float(state.loss_sum) == float(expected[0]) and int(state.correct) == int(expected[1])


def test_a_non_finite_loss_names_its_step_and_epoch():
    state = TrainState(epoch=1, step=10)
    state.start_epoch()
    for loss in (1.0, float("nan"), 2.0):
        state.step += 1
        state.add(torch.tensor(loss), None, 4)
    with pytest.raises(UserError, match=r"not finite at step 12 \(epoch 2\).*ckpt.pt"):
        state.check_finite(Distributed(), steps_per_epoch=10, checkpoint="ckpt.pt")
