"""The ``flowaug`` command (help, defaults, --version, --threads), the demo's progress, the package surface."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import flowaug
from flowaug import cli
from flowaug.demo import run_demo, train_classifier

from .conftest import tiny_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("demo", "flow", "distance")


def write_npz(root, name, split, n, size, seed=0):
    x, y = tiny_images(n, classes=3, seed=seed, size=size)
    os.makedirs(os.path.join(root, name), exist_ok=True)
    np.savez(os.path.join(root, name, f"{split}.npz"), x=(x[:, 0] * 255).round().to(torch.uint8).numpy(),
             y=y.numpy().astype(np.int64))


@pytest.fixture
def data(tmp_path):
    """A --data folder: 'mnist' (28x28) and 'usps' (16x16), train and test, 3 classes."""
    root = str(tmp_path / "data")
    for split, seed in (("train", 0), ("test", 1)):
        write_npz(root, "mnist", split, 30, 28, seed)
        write_npz(root, "usps", split, 24, 16, seed + 2)
    return root


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that runs the CLI (it sets it)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def help_entries(command, capsys):
    """``flowaug COMMAND --help`` as {option: its help text on one line}."""
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("     "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


class TestMain:
    @pytest.mark.parametrize("command", COMMANDS)
    def test_help_shows_every_default(self, command, capsys):
        entries = help_entries(command, capsys)
        sub = next(a for a in cli._parser()._actions if a.dest == "command").choices[command]
        checked = 0
        for action in sub._actions:
            if not action.option_strings or action.default in (None, "==SUPPRESS==") or action.dest == "help":
                continue
            assert f"(default: {action.default})" in entries[action.option_strings[0]], action.option_strings
            checked += 1
        assert checked >= 4

    def test_help_states_specific_defaults(self, capsys):
        flow_help = help_entries("flow", capsys)
        assert flow_help["--objective"].endswith("(default: sinkhorn)")
        assert flow_help["--backend"].endswith("(default: auto)")
        assert flow_help["--seed"].endswith("(default: 0)")
        assert flow_help["--class-map"].endswith("(default: one joint flow)")
        assert "(default: None)" not in " ".join(flow_help.values())
        distance_help = help_entries("distance", capsys)
        assert distance_help["--covariance"].endswith("(default: diag)")
        assert distance_help["--label-weight"].endswith("(default: 1.0)")

    def test_flow_and_distance_default_to_the_same_split(self, capsys):
        parser = cli._parser()
        assert parser.parse_args(["flow", "a", "b"]).split == parser.parse_args(["distance", "a", "b"]).split == "train"
        for command in ("flow", "distance"):
            entry = help_entries(command, capsys)["--split"]
            assert "test for evaluating" in entry and entry.endswith("(default: train)")

    def test_version(self, capsys):
        with pytest.raises(SystemExit) as stop:
            cli.main(["--version"])
        assert stop.value.code == 0 and capsys.readouterr().out == f"flowaug {flowaug.__version__}\n"

    def test_version_from_python_m(self):
        done = subprocess.run([sys.executable, "-m", "flowaug", "--version"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == f"flowaug {flowaug.__version__}"

    def test_threads_option_is_applied_before_work_and_printed(self, data, threads, capsys):
        assert cli.main(["distance", "mnist", "usps", "--data", data, "--threads", "1", "--max-samples", "20"]) == 0
        captured = capsys.readouterr()
        assert torch.get_num_threads() == 1
        assert "1 torch thread (--threads)" in captured.err
        assert json.loads(captured.out)["otdd"] > 0  # stdout stays the result alone

    def test_distance_stdout_is_json_alone(self, data):
        # a fresh process: pykeops prints its CUDA notice to stdout the first time it is imported
        done = subprocess.run([sys.executable, "-m", "flowaug", "distance", "mnist", "usps", "--data", data,
                               "--max-samples", "20"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout)) == {"a", "b", "otdd", "distance"}
        assert "1 torch thread ($OMP_NUM_THREADS)" in done.stderr

    @pytest.mark.parametrize("cores, env, expected, why", [
        ({0, 1}, None, 1, "auto: 2 usable cores, one left free"),
        ({0, 1, 2, 3}, None, 3, "auto: 4 usable cores, one left free"),
        ({0}, None, 1, "auto: 1 usable core"),
        ({0, 1, 2, 3}, "2", 2, "$OMP_NUM_THREADS"),
    ])
    def test_threads_auto(self, data, threads, capsys, monkeypatch, cores, env, expected, why):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
        if env is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", env)
        assert cli.main(["distance", "mnist", "usps", "--data", data, "--max-samples", "20"]) == 0
        assert torch.get_num_threads() == expected
        assert f"distance: {expected} torch thread{'s' if expected > 1 else ''} ({why})" in capsys.readouterr().err

    def test_more_threads_than_cores_is_said(self, data, threads, capsys, monkeypatch):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        assert cli.main(["distance", "mnist", "usps", "--data", data, "--threads", "3", "--max-samples", "20"]) == 0
        assert "3 torch threads (--threads; more threads than cores run slower)" in capsys.readouterr().err

    @pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
    def test_bad_threads_is_refused_naming_the_argument(self, value, threads, capsys):
        before = torch.get_num_threads()
        with pytest.raises(SystemExit) as stop:
            cli.main(["distance", "mnist", "usps", "--threads", value])
        assert stop.value.code == 2
        assert f"argument --threads: expected a positive integer or 'auto', got '{value}'" in capsys.readouterr().err
        assert torch.get_num_threads() == before


class TestRunDemo:
    def test_says_what_it_does_before_and_while_training(self, data, tmp_path, capsys):
        report = run_demo(data, str(tmp_path / "out"), steps=2)
        err = capsys.readouterr().err
        order = [f"flowaug demo: loading MNIST and USPS (from {data})",
                 "flowaug demo: MNIST -> USPS: training the classifier to freeze on MNIST",
                 "training classifier:",  # the training bar
                 "flowaug demo: unlabeled flow:",
                 "flowaug demo: class-wise flow (labels used):",
                 "flowaug demo: writing pictures and the report"]
        positions = [err.find(text) for text in order]
        assert -1 not in positions and positions == sorted(positions), err
        assert report["setting"] == "MNIST -> USPS"

    def test_silent_without_progress(self, data, tmp_path, capsys):
        run_demo(data, str(tmp_path / "out"), steps=1, progress=False)
        assert capsys.readouterr().err == ""


class TestTrainClassifier:
    def test_progress_bar_counts_batches_and_reports_the_loss(self, capsys):
        x, y = tiny_images(40, size=8)
        train_classifier(flowaug.demo.MLP(64, classes=3), x, y, epochs=2, batch_size=16, progress=True)
        err = capsys.readouterr().err
        assert "training classifier" in err and "6/6" in err and "epoch=2/2" in err and "loss=" in err

    def test_no_output_by_default(self, capsys):
        x, y = tiny_images(8, size=8)
        model = train_classifier(flowaug.demo.MLP(64, classes=3), x, y, epochs=1)
        assert not model.training and capsys.readouterr().err == ""

    @pytest.mark.parametrize("n, m", [(0, 0), (8, 7)])
    def test_bad_data_is_refused(self, n, m):
        with pytest.raises(ValueError, match=f"x and y must be non-empty and of the same length, got {n} inputs "
                                             f"and {m} labels"):
            train_classifier(flowaug.demo.MLP(64, classes=3), torch.zeros(n, 1, 8, 8),
                             torch.zeros(m, dtype=torch.long), epochs=1)


class TestPackage:
    def test_lazy_flow_annealing_is_listed(self):
        assert "FlowAnnealing" in flowaug.__all__
        names = dir(flowaug)
        assert "FlowAnnealing" in names and set(flowaug.__all__) <= set(names)
        assert "__version__" in names and names == sorted(names)

    def test_ships_py_typed(self):
        assert os.path.isfile(os.path.join(os.path.dirname(flowaug.__file__), "py.typed"))
        setup = configparser.ConfigParser()
        setup.read(os.path.join(ROOT, "setup.cfg"))
        assert "py.typed" in setup["options.package_data"]["flowaug"].split()
