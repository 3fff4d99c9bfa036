"""flowaug.gradual_lightning.GradualWalk: adapt()'s walk as Lightning fits of the user's module."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from flowaug.gradual import WalkOptions, adapt, self_train
from flowaug.gradual_lightning import STATE_FILE, GradualWalk

from .conftest import blobs

OPTIONS = {"generated": 2, "epochs": 2, "batch_size": 16}
SEED = 3


def rotated(angle_deg: float, n: int, seed: int):
    """Two Gaussian classes at +-3 along the direction ``angle_deg``: (n, 2) points, (n,) labels."""
    a = math.radians(angle_deg)
    return blobs(n // 2, [[3 * math.cos(a), 3 * math.sin(a)], [-3 * math.cos(a), -3 * math.sin(a)]], std=0.5,
                 seed=seed)


class Tiny(pl.LightningModule):
    """A user's module: Linear encoder, dropout and a Linear head; its own step trains on inputs."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 4)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kw):
    return pl.Trainer(**kw, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


@pytest.fixture(scope="module")
def setup():
    """A source-trained Tiny, the source (60 points at 0 degrees) and two domains of 40 (35 and 70 degrees)."""
    torch.manual_seed(0)
    module = Tiny()
    source = rotated(0.0, 60, seed=0)
    trained = self_train(nn.Sequential(module.encoder, module.head), *source, epochs=20, lr=0.05,
                         generator=torch.Generator().manual_seed(0))
    module.encoder.load_state_dict(trained[0].state_dict())
    module.head.load_state_dict(trained[1].state_dict())
    return module.eval(), source, [rotated(35.0, 40, seed=1)[0], rotated(70.0, 40, seed=2)[0]]


_ADAPTED = {}


def adapted(setup, train_encoder: bool) -> nn.Sequential:
    """adapt()'s result with OPTIONS and SEED (computed once per setting)."""
    if train_encoder not in _ADAPTED:
        module, source, domains = setup
        _ADAPTED[train_encoder] = adapt(module.encoder, module.head, source, domains, train_encoder=train_encoder,
                                        generator=torch.Generator().manual_seed(SEED), **OPTIONS)
    return _ADAPTED[train_encoder]


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def parts(module) -> nn.Sequential:
    return nn.Sequential(module.encoder, module.head)


class Counting:
    """A trainer factory that counts the stages it made and raises (an interruption) before stage ``stop``."""

    def __init__(self, stop: int | None = None):
        self.stop, self.made = stop, 0

    def __call__(self, **kw):
        if self.made == self.stop:
            raise KeyboardInterrupt("interrupted between stages")
        self.made += 1
        return trainer(**kw)


@pytest.mark.parametrize("train_encoder", [True, False])
def test_equals_adapt(setup, train_encoder):
    module, source, domains = setup
    walk = GradualWalk(source, domains, train_encoder=train_encoder, seed=SEED, **OPTIONS)
    result = walk.fit(module, trainer=trainer)
    reference = adapted(setup, train_encoder)
    difference = max_difference(parts(result), reference)
    print(f"train_encoder={train_encoder}: max |GradualWalk - adapt| = {difference:.3g}")
    assert difference <= 1e-6
    assert max_difference(parts(result), parts(module)) > 1e-3  # it did train
    if not train_encoder:
        assert max_difference(result.encoder, module.encoder) == 0


def test_resume_after_interruption_is_exact(setup, tmp_path):
    module, source, domains = setup
    per_walk = 2 * (OPTIONS["generated"] + 1)
    stop = 4  # inside the second gap: the resumed walk rebuilds that gap's path from the gap's start
    walk = GradualWalk(source, domains, seed=SEED, dirpath=tmp_path, **OPTIONS)
    with pytest.raises(KeyboardInterrupt):
        walk.fit(module, trainer=Counting(stop))
    assert (tmp_path / STATE_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name != STATE_FILE]  # nothing half-written beside it
    rest = Counting()
    resumed = GradualWalk(source, domains, seed=SEED, dirpath=tmp_path, **OPTIONS).fit(module, trainer=rest)
    assert rest.made == per_walk - stop
    uninterrupted = GradualWalk(source, domains, seed=SEED, **OPTIONS).fit(module, trainer=trainer)
    assert max_difference(parts(resumed), parts(uninterrupted)) <= 1e-6
    assert max_difference(parts(resumed), adapted(setup, True)) <= 1e-6
    done = Counting()  # a finished walk's state gives its result without training
    again = GradualWalk(source, domains, seed=SEED, dirpath=tmp_path, **OPTIONS).fit(module, trainer=done)
    assert done.made == 0 and max_difference(parts(again), parts(resumed)) == 0


def test_resume_refuses_another_walk(setup, tmp_path):
    module, source, domains = setup
    with pytest.raises(KeyboardInterrupt):
        GradualWalk(source, domains, seed=SEED, dirpath=tmp_path, **OPTIONS).fit(module, trainer=Counting(1))
    with pytest.raises(ValueError, match="epochs: 2 there, 3 here"):
        GradualWalk(source, domains, seed=SEED, dirpath=tmp_path, **{**OPTIONS, "epochs": 3}).fit(module, trainer)
    with pytest.raises(ValueError, match="seed: 3 there, 4 here"):
        GradualWalk(source, domains, seed=4, dirpath=tmp_path, **OPTIONS).fit(module, trainer)
    with pytest.raises(ValueError, match=r"domain_sizes: \[40, 40\] there, \[40, 30\] here"):
        GradualWalk(source, [domains[0], domains[1][:30]], seed=SEED, dirpath=tmp_path, **OPTIONS).fit(module, trainer)
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.head[1].bias.add_(0.1)
    with pytest.raises(ValueError, match="weights: content"):
        GradualWalk(source, domains, seed=SEED, dirpath=tmp_path, **OPTIONS).fit(other, trainer)
    (tmp_path / STATE_FILE).write_bytes(b"not a state")
    with pytest.raises(ValueError, match="cannot be read as a GradualWalk state"):
        GradualWalk(source, domains, seed=SEED, dirpath=tmp_path, **OPTIONS).fit(module, trainer)


def test_user_module_and_global_stream_unchanged(setup):
    module, source, domains = setup
    before = copy.deepcopy(module.state_dict())
    rng = torch.get_rng_state()
    result = GradualWalk(source, domains, generated=1, epochs=1, schedule="cosine").fit(module, trainer=trainer)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert type(result) is Tiny and result is not module and not result.training
    assert result.encoder is not module.encoder and result.head is not module.head
    assert result._trainer is None
    import flowaug

    assert flowaug.GradualWalk is GradualWalk and "GradualWalk" in dir(flowaug)


def test_bad_inputs(setup):
    module, source, domains = setup
    walk = GradualWalk(source, domains, **OPTIONS)
    with pytest.raises(ValueError, match="encoder='backbone': Tiny has no attribute 'backbone'"):
        GradualWalk(source, domains, encoder="backbone", **OPTIONS).fit(module, trainer)
    with pytest.raises(TypeError, match=r"head='configure_optimizers': Tiny.configure_optimizers must be a torch"):
        GradualWalk(source, domains, head="configure_optimizers", **OPTIONS).fit(module, trainer)
    with pytest.raises(TypeError, match="encoder must be the name of an attribute"):
        GradualWalk(source, domains, encoder=module.encoder)
    with pytest.raises(ValueError, match="two different attributes"):
        GradualWalk(source, domains, encoder="head")
    with pytest.raises(TypeError, match="not both"):
        GradualWalk(source, domains, options=WalkOptions(), epochs=2)
    with pytest.raises(TypeError, match="options must be a flowaug.gradual.WalkOptions"):
        GradualWalk(source, domains, options={"epochs": 2})
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['epoch'\]"):
        GradualWalk(source, domains, epoch=2)
    with pytest.raises(TypeError, match="dirpath must be a folder path"):
        GradualWalk(source, domains, dirpath=3)
    with pytest.raises(ValueError, match="dirpath must be a folder"):
        GradualWalk(source, domains, dirpath=__file__)
    with pytest.raises(TypeError, match="module must be your LightningModule"):
        walk.fit(parts(module).state_dict(), trainer)
    with pytest.raises(ValueError, match=r"domains\[1\] must have the source's sample shape"):
        GradualWalk(source, [domains[0], torch.randn(40, 3)]).fit(module, trainer)
    with pytest.raises(TypeError, match="trainer must be a factory"):
        walk.fit(module, trainer=3)
    with pytest.raises(ValueError, match=r"trainer: \['max_epochs'\] are set by the walk"):
        walk.fit(module, trainer={"max_epochs": 5, "accelerator": "cpu"})
    with pytest.raises(TypeError, match="trainer must return a lightning.pytorch.Trainer"):
        walk.fit(module, trainer=lambda **kw: None)
    with pytest.raises(ValueError, match="the Trainer has max_epochs=5 but the walk trains every stage for epochs=2"):
        walk.fit(module, trainer=lambda **kw: trainer(**{**kw, "max_epochs": 5}))
    with pytest.raises(RuntimeError, match="made 4 optimizer steps where the walk makes 8 \\(2 epochs x 4 batches\\)"):
        walk.fit(module, trainer=lambda **kw: trainer(**kw, callbacks=[StopAfterEpoch()]))


class StopAfterEpoch(pl.Callback):
    """An early stop after the first epoch (as EarlyStopping would)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True
