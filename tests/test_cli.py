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
from flowaug.demo import run_demo

from .conftest import tiny_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("demo", "flow", "distance", "condense")
DISTANCE_KEYS = ("a", "b", "split", "size", "samples", "seed", "label_weight", "covariance", "blur", "otdd",
                 "distance")


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
        assert checked >= (2 if command == "demo" else 4)  # demo: --out and --threads

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

    def test_flow_objective_choices_are_every_objective_name(self, capsys):
        """Issue 26: --objective missed linear (and gaussian, otdd), which flow() accepts."""
        from flowaug.objectives import OBJECTIVES

        entry = help_entries("flow", capsys)["--objective"]
        assert all(name in entry for name in ("linear", "gaussian", "otdd"))
        assert cli._parser().parse_args(["flow", "a", "b", "--objective", "linear"]).objective == "linear"
        assert set(next(a for a in cli._parser()._actions if a.dest == "command").choices["flow"]._option_string_actions[
            "--objective"].choices) == set(OBJECTIVES)

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
        done = subprocess.run([sys.executable, "-m", "flowaug", "--version"], capture_output=True, text=True, check=False,
                              cwd=ROOT, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == f"flowaug {flowaug.__version__}"

    def test_threads_option_is_applied_before_work_and_printed(self, data, threads, capsys):
        assert cli.main(["distance", "mnist", "usps", "--data", data, "--threads", "1", "--limit", "20"]) == 0
        captured = capsys.readouterr()
        assert torch.get_num_threads() == 1
        assert "1 torch thread (--threads)" in captured.err
        assert json.loads(captured.out)["otdd"] > 0  # stdout stays the result alone

    def test_distance_stdout_is_json_alone(self, data):
        # a fresh process: pykeops prints its CUDA notice to stdout the first time it is imported
        done = subprocess.run([sys.executable, "-m", "flowaug", "distance", "mnist", "usps", "--data", data,
                               "--limit", "20"], capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout)) == set(DISTANCE_KEYS) | {"fields"}
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
        assert cli.main(["distance", "mnist", "usps", "--data", data, "--limit", "20"]) == 0
        assert torch.get_num_threads() == expected
        assert f"distance: {expected} torch thread{'s' if expected > 1 else ''} ({why})" in capsys.readouterr().err

    def test_more_threads_than_cores_is_said(self, data, threads, capsys, monkeypatch):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        assert cli.main(["distance", "mnist", "usps", "--data", data, "--threads", "3", "--limit", "20"]) == 0
        assert "3 torch threads (--threads; more threads than cores run slower)" in capsys.readouterr().err

    @pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
    def test_bad_threads_is_refused_naming_the_argument(self, value, threads, capsys):
        before = torch.get_num_threads()
        with pytest.raises(SystemExit) as stop:
            cli.main(["distance", "mnist", "usps", "--threads", value])
        assert stop.value.code == 2
        assert f"argument --threads: expected a positive integer or 'auto', got '{value}'" in capsys.readouterr().err
        assert torch.get_num_threads() == before


def run_distance(capsys, *args):
    """``flowaug distance ARGS`` in this process: (its JSON, its stderr)."""
    assert cli.main(["distance", *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def cli_error(capsys, *args):
    """A refused ``flowaug distance ARGS``: its stderr (usage errors exit 2, load errors return 2)."""
    try:
        code = cli.main(["distance", *args])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.usefixtures("threads")
class TestDistanceCommand:
    def test_the_order_of_the_datasets_does_not_matter(self, data, capsys):
        # the fixture's mnist (30 images, 28x28) is subsampled by --limit, usps (24, 16x16) is not and is resized
        ab, err_ab = run_distance(capsys, "mnist", "usps", "--data", data, "--limit", "20")
        ba, err_ba = run_distance(capsys, "usps", "mnist", "--data", data, "--limit", "20")
        assert ab["otdd"] > 0 and abs(ab["otdd"] - ba["otdd"]) < 1e-3 * ab["otdd"]
        assert abs(ab["distance"] - ba["distance"]) < 1e-3 * ab["distance"]
        assert ab["size"] == ba["size"] == [28, 28]
        assert ab["samples"] == {"a": 20, "b": 20} and ba["samples"] == {"a": 20, "b": 20}
        assert ab["blur"] == pytest.approx(ba["blur"], rel=1e-9)
        assert "resizing b (usps) from 16x16 to 28x28, the common size (the larger of the two" in err_ab
        assert "resizing a (usps) from 16x16 to 28x28" in err_ba

    @pytest.mark.parametrize("size, expected", [(["16"], [16, 16]), (["12", "20"], [12, 20])])
    def test_size_option_sets_the_common_size_in_both_orders(self, data, capsys, size, expected):
        ab, err = run_distance(capsys, "mnist", "usps", "--data", data, "--limit", "20", "--size", *size)
        ba, _ = run_distance(capsys, "usps", "mnist", "--data", data, "--limit", "20", "--size", *size)
        assert ab["size"] == ba["size"] == expected
        assert abs(ab["otdd"] - ba["otdd"]) < 1e-3 * ab["otdd"]
        shown = f"{expected[0]}x{expected[1]}, the common size (--size)"
        assert f"resizing a (mnist) from 28x28 to {shown}" in err
        assert (f"resizing b (usps) from 16x16 to {shown}" in err) == (expected != [16, 16])

    def test_no_resizing_note_when_sizes_agree(self, data, capsys):
        out, err = run_distance(capsys, "mnist", "mnist", "--data", data, "--limit", "20")
        assert out["size"] == [28, 28] and "resizing" not in err
        assert abs(out["otdd"]) < 1e-6  # the same dataset, the same sample in both positions

    def test_json_says_what_each_field_is(self, data, capsys):
        out, _ = run_distance(capsys, "mnist", "usps", "--data", data, "--limit", "20", "--label-weight", "0.5",
                              "--split", "test", "--seed", "3")
        assert list(out) == [*DISTANCE_KEYS, "fields"]
        assert set(out["fields"]) == set(out)
        assert all(isinstance(text, str) and text for text in out["fields"].values())
        assert (out["a"], out["b"], out["split"], out["seed"]) == ("mnist", "usps", "test", 3)
        assert (out["label_weight"], out["covariance"]) == (0.5, "diag")
        assert out["distance"] == pytest.approx((2 * out["otdd"]) ** 0.5)
        assert "debiased Sinkhorn divergence" in out["fields"]["otdd"] and "squared data units" in out["fields"]["otdd"]
        assert out["fields"]["distance"].startswith("sqrt(2 * otdd): in data units")
        assert "common image size" in out["fields"]["size"]

    def test_limit_is_one_name_in_flow_and_distance(self, capsys):
        flow_help, distance_help = help_entries("flow", capsys), help_entries("distance", capsys)
        assert "use at most this many samples of each dataset" in flow_help["--limit"]
        assert "use at most this many samples of each dataset" in distance_help["--limit"]
        assert "--max-samples" in distance_help["--limit"] and "deprecated" in distance_help["--limit"]
        parser = cli._parser()
        assert parser.parse_args(["distance", "a", "b", "--limit", "7"]).limit == 7

    def test_max_samples_is_a_deprecated_alias_of_limit(self, data, capsys):
        new, err_new = run_distance(capsys, "mnist", "usps", "--data", data, "--limit", "20")
        old, err_old = run_distance(capsys, "mnist", "usps", "--data", data, "--max-samples", "20")
        assert old == new and old["samples"] == {"a": 20, "b": 20}
        notices = [line for line in err_old.splitlines() if "deprecated" in line]
        assert notices == ["flowaug distance: --max-samples is deprecated, use --limit (same meaning)"]
        assert "deprecated" not in err_new

    @pytest.mark.parametrize("option", ["--limit", "--max-samples"])
    @pytest.mark.parametrize("value", ["0", "1", "-5"])
    def test_limit_below_two_is_refused_under_either_name(self, data, capsys, option, value):
        err = cli_error(capsys, "mnist", "usps", "--data", data, option, value)
        assert f"argument --limit: expected an integer >= 2, got {value}" in err

    @pytest.mark.parametrize("args, message", [
        (["--size", "0"], "argument --size: expected one or two positive integers (N or H W), got '0'"),
        (["--size", "x"], "argument --size: expected one or two positive integers (N or H W), got 'x'"),
        (["--size", "8", "8", "8"], "argument --size: expected one or two positive integers (N or H W), got 3 values"),
        (["--label-weight", "-1"], "argument --label-weight: expected a finite number >= 0 (0: features only), got -1.0"),
        (["--label-weight", "nan"], "argument --label-weight: expected a finite number >= 0 (0: features only), got nan"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        (["--covariance", "tied"], "argument --covariance: invalid choice: 'tied'"),
    ])
    def test_bad_options_are_refused_naming_the_argument(self, data, capsys, args, message):
        assert message in cli_error(capsys, "mnist", "usps", "--data", data, *args)

    def test_missing_dataset_is_refused_naming_the_argument(self, data, capsys):
        err = cli_error(capsys, "mnist", "nope", "--data", data)
        assert "flowaug distance: error: argument b ('nope'): dataset 'nope' not found" in err
        err = cli_error(capsys, "nope", "usps", "--data", data)
        assert "flowaug distance: error: argument a ('nope'): dataset 'nope' not found" in err

    def test_missing_data_folder_is_refused_naming_the_argument(self, tmp_path, capsys):
        err = cli_error(capsys, "mnist", "usps", "--data", str(tmp_path / "absent"))
        assert "error: argument --data: expected an existing folder of datasets" in err

    def test_different_channel_counts_are_refused(self, data, capsys):
        x = np.zeros((4, 3, 8, 8), np.uint8)
        os.makedirs(os.path.join(data, "rgb"))
        np.savez(os.path.join(data, "rgb", "train.npz"), x=x, y=np.arange(4) % 2)
        err = cli_error(capsys, "mnist", "rgb", "--data", data)
        assert "arguments a and b must have the same number of channels, got 'mnist' with 1 and 'rgb' with 3" in err


class TestRunDemo:
    def test_leads_with_gradual_adaptation_and_says_what_it_does(self, data, tmp_path, capsys):
        report = run_demo(data, str(tmp_path / "out"), condensation=False)
        err = capsys.readouterr().err
        order = ["flowaug demo: gradual adaptation: MNIST, rotation 0 -> 60 degrees, two unlabelled snapshots",
                 "flowaug demo: gradual self-training: GOAT's path",
                 "flowaug demo: gradual self-training: flowaug",
                 "flowaug demo: gradual self-training: oracle",
                 "flowaug demo: writing the report"]
        positions = [err.find(text) for text in order]
        assert -1 not in positions and positions == sorted(positions), err
        accuracy = report["gradual"]["accuracy"]
        assert list(accuracy)[0] == "source only" and all(0 <= a <= 100 for a in accuracy.values())
        text = open(tmp_path / "out" / "report.md").read()
        assert text.index("Gradual adaptation") < text.index("| oracle: 10 real intermediate rotations (no user")
        assert os.path.getsize(report["gradual"]["file"]) > 0

    def test_silent_without_progress_and_the_random_stream_is_left_alone(self, data, tmp_path, capsys):
        before = torch.get_rng_state()
        run_demo(data, str(tmp_path / "out"), progress=False, condensation=False)
        assert capsys.readouterr().err == "" and torch.equal(before, torch.get_rng_state())

    def test_condensation_leads_and_compares_at_the_same_size(self, data, tmp_path, capsys):
        from flowaug.demo import condense_section

        c = condense_section(data, str(tmp_path / "out"), ipc=2, iterations=2, width=4, epochs=2)
        assert list(c["accuracy"]) == ["random real images", "distribution matching", "flowaug condense"]
        assert all(0 <= a <= 100 for a in c["accuracy"].values())
        assert os.path.getsize(c["file"]) > 0
        err = capsys.readouterr().err
        assert err.find("flowaug demo: condensation") < err.find("training a ConvNet-3 on 6 images")


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


class TestCondense:
    def test_writes_the_synthetic_set_and_resumes(self, data, tmp_path, threads, capsys):
        out = str(tmp_path / "out")
        args = ["condense", "mnist", "--data", data, "--ipc", "2", "--iterations", "3", "--real-per-class", "4",
                "--width", "4", "--out", out]
        assert cli.main(args) == 0
        saved = np.load(os.path.join(out, "condensed.npz"))
        assert saved["x"].shape == (6, 1, 28, 28) and sorted(saved["y"].tolist()) == [0, 0, 1, 1, 2, 2]
        assert os.path.getsize(os.path.join(out, "condensed.png")) > 0
        assert cli.main(args) == 0  # the finished checkpoint is found: the same result, no work
        assert np.array_equal(np.load(os.path.join(out, "condensed.npz"))["x"], saved["x"])
        assert "wrote" in capsys.readouterr().out

    def test_a_folder_with_train_npz_is_a_dataset(self, data, tmp_path, threads):
        out = str(tmp_path / "out")
        assert cli.main(["condense", os.path.join(data, "usps"), "--ipc", "1", "--iterations", "1", "--width", "4",
                         "--real-per-class", "4", "--out", out]) == 0
        assert np.load(os.path.join(out, "condensed.npz"))["x"].shape == (3, 1, 16, 16)

    @pytest.mark.parametrize("option, value", [("--ipc", "0"), ("--width", "0"), ("--real-per-class", "1")])
    def test_bad_numbers_name_the_argument(self, data, capsys, option, value):
        with pytest.raises(SystemExit):
            cli.main(["condense", "mnist", "--data", data, option, value])
        assert f"argument {option}" in capsys.readouterr().err
