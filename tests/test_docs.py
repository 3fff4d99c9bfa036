"""What users run first: the README's Quick start, the examples (under both multiprocessing start methods), and
the console output of a CPU run (no KeOps CUDA notice). Each runs in a fresh interpreter, in a scratch folder."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXAMPLES = os.path.join(ROOT, "examples")
EXAMPLE_FILES = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py") and not f.startswith("_"))
NOTICE = "CUDA libraries not found"


def run_python(args, cwd, timeout=300, pythonpath=()):
    """``python *args`` in ``cwd`` with one thread and ``cwd`` as TMPDIR (nothing left behind elsewhere)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(cwd))
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def quick_start() -> tuple[str, str]:
    """The Quick start section of README.md and its ```python blocks, joined (each runs as is)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", readme, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    assert blocks, "README.md's Quick start has no ```python block"
    return section.group(1), "\n".join(blocks)


# ---------------------------------------------------------------------------------------------- README
def test_quick_start_runs_as_written(tmp_path):
    _, code = quick_start()
    (tmp_path / "quick_start.py").write_text(code)
    done = run_python(["quick_start.py"], tmp_path, timeout=180)
    assert done.returncode == 0, f"README Quick start failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_quick_start_says_batch_and_reference_share_the_sample_shape():
    text, _ = quick_start()
    assert "same sample shape" in text


# ---------------------------------------------------------------------------------------------- examples
def with_start_method(source: str, method: str) -> str:
    """The example's source with ``multiprocessing.set_start_method(method)`` as the first statement of its
    ``if __name__ == "__main__":`` block (of the module, when it has none), so the real script runs, its
    classes stay importable from ``__main__`` in spawned workers, and only the start method changes."""
    line = f"import multiprocessing; multiprocessing.set_start_method({method!r}, force=True)\n"
    lines = source.splitlines(keepends=True)
    for i, text in enumerate(lines):
        if text.strip() in ('if __name__ == "__main__":', "if __name__ == '__main__':"):
            body = next(t for t in lines[i + 1:] if t.strip())
            lines.insert(i + 1, body[: len(body) - len(body.lstrip())] + line)
            return "".join(lines)
    return line + source


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_runs_under_start_method(name, method, tmp_path):
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as handle:
        source = handle.read()
    if "../shared" in source and not os.path.isdir(os.path.join(ROOT, "..", "shared")):
        pytest.skip(f"{name} reads ../shared, absent here")
    (tmp_path / name).write_text(with_start_method(source, method))
    done = run_python([name], tmp_path, pythonpath=[EXAMPLES])  # _domains.py is imported from examples/
    assert done.returncode == 0, f"{name} ({method}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if name == "kshot_recipe.py":  # issue 26: its toy saturated (25 / 100 / 100 %) and showed nothing
        accuracies = [float(a) for a in re.findall(r"([\d.]+)%", done.stdout)]
        assert len(accuracies) == 3 and max(accuracies) < 99, done.stdout


def test_start_method_is_set_inside_the_main_block():
    src = 'import x\n\n\nif __name__ == "__main__":\n    main()\n'
    assert with_start_method(src, "spawn").splitlines()[4] == (
        "    import multiprocessing; multiprocessing.set_start_method('spawn', force=True)")
    assert with_start_method("import x\n", "fork").startswith("import multiprocessing;")


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_collate_with_the_library_and_guard_their_workers(name):
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as handle:
        source = handle.read()
    assert not re.search(r"^\s*(class FlowCollate|def collate)\b", source, re.MULTILINE), "use flowaug.FlowCollate"
    if re.search(r"num_workers=[1-9]", source):  # workers spawned from an unguarded script re-run it
        assert 'if __name__ == "__main__":' in source
        assert "collate_fn=flowaug.FlowCollate(" in source


def test_kshot_recipe_builds_the_k_its_docstring_names():
    with open(os.path.join(EXAMPLES, "kshot_recipe.py"), encoding="utf-8") as handle:
        source = handle.read()
    assert "selected for k = 1" in source and re.search(r"^K = 1\b", source, re.MULTILINE)
    assert "shots = domain(4 * K," in source


# ---------------------------------------------------------------------------------------------- KeOps notice
KEOPS_NOTICE_RUN = """
import sys
import torch
import flowaug
from flowaug.distance import otdd  # geomloss, which imports pykeops (and keopscore) at its own import
if sys.argv[1] == "unfiltered":  # the control: what a first import prints without flowaug's filter
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "flowaug_keops_notice", False)]
x, y = torch.rand(30, 4), torch.arange(30) % 2
print("otdd", round(otdd(x, y, x + 1, y), 3))
if sys.argv[2] == "keops":
    out = flowaug.flow(x, y, reference=(x + 1, y), steps=2, backend="keops")
    print("backend", out.backend)
"""


def notice_run(tmp_path, mode: str, backend: str):
    (tmp_path / "run.py").write_text(KEOPS_NOTICE_RUN)
    done = run_python(["run.py", mode, backend], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def check_no_notice(tmp_path, backend: str):
    pytest.importorskip("pykeops")
    pytest.importorskip("geomloss")
    control = notice_run(tmp_path, "unfiltered", "none")
    if NOTICE not in control.stdout + control.stderr:
        pytest.skip("keopscore prints no CUDA notice on this machine (it found CUDA)")
    done = notice_run(tmp_path, "filtered", backend)
    assert NOTICE not in done.stdout and NOTICE not in done.stderr, (done.stdout, done.stderr)
    assert "otdd 4.0" in done.stdout  # the run's own output is untouched
    return done


def test_cpu_run_through_geomloss_prints_no_keops_cuda_notice(tmp_path):
    check_no_notice(tmp_path, "none")


@pytest.mark.keops
def test_cpu_flow_with_the_keops_backend_prints_no_cuda_notice(tmp_path):
    done = check_no_notice(tmp_path, "keops")
    assert "backend " in done.stdout


def test_notice_filter_drops_that_notice_only():
    from flowaug.backends.keops import CUDA_NOTICE, _WithoutNotice

    out = io.StringIO()
    quiet = _WithoutNotice(out)
    quiet.write("before\n[KeOps] Warning : " + CUDA_NOTICE)
    quiet.write("\n[KeOps] Warning : OpenMP not found\n")
    quiet.write("partial line")
    quiet.finish()
    assert out.getvalue() == "before\n[KeOps] Warning : OpenMP not found\npartial line"
