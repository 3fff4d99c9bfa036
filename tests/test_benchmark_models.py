"""benchmarks/models.py: the training loop the transfer and re-purposing benchmarks use."""

import pytest
import torch
from torch import nn

from benchmarks.models import per_class, train_classifier
from tests.conftest import tiny_images


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


def test_progress_bar_counts_batches_and_reports_the_loss(capsys):
    x, y = tiny_images(40, size=8)
    train_classifier(mlp(), x, y, epochs=2, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "training classifier" in err and "6/6" in err and "epoch=2/2" in err and "loss=" in err


def test_no_output_by_default_and_eval_mode(capsys):
    x, y = tiny_images(8, size=8)
    assert not train_classifier(mlp(), x, y, epochs=1).training and capsys.readouterr().err == ""


@pytest.mark.parametrize("n, m", [(0, 0), (8, 7)])
def test_bad_data_is_refused(n, m):
    with pytest.raises(ValueError, match=f"x and y must be non-empty and of the same length, got {n} inputs "
                                         f"and {m} labels"):
        train_classifier(mlp(), torch.zeros(n, 1, 8, 8), torch.zeros(m, dtype=torch.long), epochs=1)


def test_per_class_draws_k_of_each_class():
    x, y = tiny_images(30, size=8)
    xs, ys = per_class(x, y, 4, seed=0)
    assert torch.bincount(ys).tolist() == [4, 4, 4] and len(xs) == 12
