"""`ortbuild batch`: a zoo of tiny models x recipes exported end to end, resumed, with failures isolated.

Exports run as real child processes here (that isolation is the point of the design), so these tests go through
`python -m builder batch` and read the summary files the batch leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest

from builder.batch import folder_size, remove_partials, stored_verification_applies
from builder.child_process import Children, run_child
from builder.cli import main
from builder.errors import UsageError
from builder.zoo import load_zoo

REPO = Path(__file__).resolve().parent.parent


def batch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "builder", "batch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def summary(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / "summary.json").read_text())["exports"]}


@pytest.fixture()
def zoo_dir(tiny_checkpoint, tmp_path):
    """A folder with copies of two tiny checkpoints (llama, qwen3) and a broken one (truncated safetensors)."""
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "llama")
    shutil.copytree(tiny_checkpoint("qwen3"), tmp_path / "qwen3")
    shutil.copytree(tiny_checkpoint("qwen3"), tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return tmp_path


ZOO = """\
out_root: out
recipes:
  fp32-cpu: {precision: fp32, ep: cpu}
  int4-cpu:
    precision: int4
    ep: cpu
    extra_options: {int4_block_size: 64, int4_is_symmetric: false}
models:
  - model: ./llama
  - model: ./qwen3
  - model: ./broken
    recipes: [fp32-cpu]
"""


def test_zoo_exports_resumes_and_isolates_a_failure(zoo_dir):
    (zoo_dir / "zoo.yaml").write_text(ZOO)
    out = zoo_dir / "out"
    good = ["llama-fp32-cpu", "llama-int4-cpu", "qwen3-fp32-cpu", "qwen3-int4-cpu"]

    first = batch(zoo_dir, "zoo.yaml", "--jobs", "2")
    assert first.returncode == 1, first.stderr
    assert "1 of 5 exports did not complete (broken-fp32-cpu)" in first.stderr
    results = summary(out)
    assert sorted(results) == sorted(good + ["broken-fp32-cpu"])
    for name in good:  # the failure did not stop the others
        r = results[name]
        assert r["status"] == "exported" and r["exit_code"] == 0, r
        assert r["wall_s"] > 0 and 20 * 2**20 < r["peak_rss_bytes"] < 4 * 2**30
        assert r["size_bytes"] == folder_size(out / name)
        assert Path(r["log"]).read_text().startswith("$ ")  # one log per export, with its command line
        manifest = json.loads((out / name / "ortbuild.json").read_text())
        assert (manifest["precision"], manifest["ep"]) == tuple(name.split("-")[1:])
    int4 = onnx.load(str(out / "qwen3-int4-cpu" / "model.onnx"), load_external_data=False)
    nbits = [n for n in int4.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in nbits)  # recipe options
    broken = results["broken-fp32-cpu"]
    assert broken["status"] == "failed" and broken["exit_code"] == 4  # CheckpointError
    assert "truncated" in broken["error"] and "ortbuild: bad checkpoint" in Path(broken["log"]).read_text()
    assert not (out / "broken-fp32-cpu").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left behind
    table = (out / "summary.md").read_text()
    assert table.count("\n| ") == 6 and "| broken | fp32-cpu | broken-fp32-cpu | failed |" in table

    # Resume: fix the broken model and rerun the same command; only the missing export runs.
    mtimes = {name: (out / name / "model.onnx").stat().st_mtime_ns for name in good}
    shutil.rmtree(zoo_dir / "broken")
    shutil.copytree(zoo_dir / "qwen3", zoo_dir / "broken")
    second = batch(zoo_dir, "zoo.yaml", "--jobs", "2")
    assert second.returncode == 0, second.stderr
    resumed = summary(out)
    assert resumed["broken-fp32-cpu"]["status"] == "exported"
    for name in good:
        assert resumed[name]["status"] == "skipped"
        assert (out / name / "model.onnx").stat().st_mtime_ns == mtimes[name]  # not rewritten
        # figures of the run that made the output are carried over, marked as such
        assert resumed[name]["previous_run"] and resumed[name]["wall_s"] == results[name]["wall_s"]
    assert "(earlier run)" in (out / "summary.md").read_text()


def test_changed_recipe_is_reported_stale_and_force_reexports(zoo_dir):
    zoo = zoo_dir / "zoo.yaml"
    zoo.write_text("recipes:\n  base: {precision: fp32}\nname_template: '{model_name}-{recipe}'\n"
                   "models:\n  - model: ./llama\n")
    assert batch(zoo_dir, "zoo.yaml", "--out-root", "out").returncode == 0
    zoo.write_text(zoo.read_text().replace("precision: fp32", "precision: int4"))
    exported = summary(zoo_dir / "out")["llama-base"]
    stale = batch(zoo_dir, "zoo.yaml", "--out-root", "out")
    assert stale.returncode == 1
    result = summary(zoo_dir / "out")["llama-base"]
    assert result["status"] == "stale" and "precision 'fp32' (recipe: 'int4')" in result["error"]
    assert "[batch] llama-base: stale, not re-exported: " in stale.stderr  # said on the console, not only in files
    assert json.loads((zoo_dir / "out/llama-base/ortbuild.json").read_text())["precision"] == "fp32"  # untouched
    assert result["wall_s"] == exported["wall_s"] and result["previous_run"]  # the output's figures are kept
    zoo.write_text(zoo.read_text().replace("precision: int4", "precision: fp32"))
    back = batch(zoo_dir, "zoo.yaml", "--out-root", "out")
    assert back.returncode == 0, back.stderr
    skipped = summary(zoo_dir / "out")["llama-base"]
    assert skipped["status"] == "skipped" and skipped["wall_s"] == exported["wall_s"]
    assert skipped["peak_rss_bytes"] == exported["peak_rss_bytes"]
    zoo.write_text(zoo.read_text().replace("precision: fp32", "precision: int4"))
    forced = batch(zoo_dir, "zoo.yaml", "--out-root", "out", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((zoo_dir / "out/llama-base/ortbuild.json").read_text())["precision"] == "int4"


def test_a_model_path_relative_to_the_working_directory_resumes(zoo_dir):
    """`ortbuild batch ../zoo.yaml` naming `model: models/llama` relative to where the batch runs: the rerun skips
    the complete output (the manifest records the folder absolute; the zoo path is normalised the same way)."""
    work = zoo_dir / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(zoo_dir / "llama", work / "models" / "llama")
    (zoo_dir / "zoo.yaml").write_text("recipes:\n  fp32: {precision: fp32}\nmodels:\n  - model: models/llama\n")
    first = batch(work, "../zoo.yaml", "--out-root", "out")
    assert first.returncode == 0, first.stderr
    made = summary(work / "out")["llama-fp32-cpu"]
    assert json.loads((work / "out/llama-fp32-cpu/ortbuild.json").read_text())["source"] == \
        str((work / "models" / "llama").resolve())
    again = batch(work, "../zoo.yaml", "--out-root", "out")
    assert again.returncode == 0, again.stderr
    assert "llama-fp32-cpu: already complete, skipped" in again.stderr
    rerun = summary(work / "out")["llama-fp32-cpu"]
    assert rerun["status"] == "skipped" and rerun["previous_run"] and rerun["wall_s"] == made["wall_s"]


def test_a_zoo_folder_that_exists_nowhere_fails_before_any_export(tmp_path, capsys):
    path = tmp_path / "zoo.yaml"
    path.write_text("recipes:\n  fp32: {precision: fp32}\nmodels:\n  - model: ./missing/llama\n")
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(path), "--out-root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no such folder ./missing/llama (looked beside the zoo file" in err
    assert not (tmp_path / "out").exists()


def test_a_foreign_folder_in_the_way_is_reported_not_overwritten(zoo_dir):
    (zoo_dir / "zoo.yaml").write_text("recipes:\n  fp32: {precision: fp32}\nmodels:\n  - model: ./llama\n")
    foreign = zoo_dir / "out" / "llama-fp32-cpu"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    result = batch(zoo_dir, "zoo.yaml", "--out-root", "out")
    assert result.returncode == 1
    error = summary(zoo_dir / "out")["llama-fp32-cpu"]["error"]
    assert "not a complete export (missing model.onnx, model.onnx.data, genai_config.json, ortbuild.json)" in error
    assert (foreign / "notes.txt").read_text() == "mine"


def test_timeout_kills_the_export_and_a_rerun_completes_it(zoo_dir):
    (zoo_dir / "zoo.yaml").write_text("recipes:\n  fp32: {precision: fp32}\nmodels:\n  - model: ./qwen3\n")
    killed = batch(zoo_dir, "zoo.yaml", "--out-root", "out", "--timeout", "0.2")
    assert killed.returncode == 1
    result = summary(zoo_dir / "out")["qwen3-fp32-cpu"]
    assert result["status"] == "timeout" and result["error"] == "timed out after 0.2 s"
    assert not (zoo_dir / "out" / "qwen3-fp32-cpu").exists()
    rerun = batch(zoo_dir, "zoo.yaml", "--out-root", "out")
    assert rerun.returncode == 0 and summary(zoo_dir / "out")["qwen3-fp32-cpu"]["status"] == "exported"


def test_sigterm_stops_the_running_export_and_records_the_rest_as_interrupted(zoo_dir):
    (zoo_dir / "zoo.yaml").write_text("recipes:\n  fp32: {precision: fp32}\n  int8: {precision: int8}\n"
                                      "models:\n  - model: ./qwen3\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "builder", "batch", "zoo.yaml", "--out-root", "out", "-v"],
                            cwd=zoo_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_log = zoo_dir / "out" / "_logs" / "qwen3-fp32-cpu.export.log"
    deadline = time.monotonic() + 60
    while not first_log.exists() and time.monotonic() < deadline:  # the first export has started
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted: stopping" in err, err
    results = summary(zoo_dir / "out")
    assert results["qwen3-fp32-cpu"]["status"] == "interrupted", err  # stopped mid-way (its log says how)
    assert results["qwen3-fp32-cpu"]["exit_code"] in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert results["qwen3-int8-cpu"]["status"] == "interrupted"  # never started
    assert not any((zoo_dir / "out").glob(".qwen3-*"))


def test_only_selects_outputs_by_name(tmp_path, capsys):
    path = write_zoo(tmp_path, BASE)
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(path), "--out-root", str(tmp_path / "out"), "--only", "b-*"])
    assert exc.value.code == 2 and "--only b-* matches none of: a-int4-cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_figures_land_in_the_summary_and_are_reused_on_resume(zoo_dir):
    (zoo_dir / "zoo.yaml").write_text("recipes:\n  fp32: {precision: fp32, verify_steps: 2}\n"
                                      "models:\n  - model: ./llama\n")
    first = batch(zoo_dir, "zoo.yaml", "--out-root", "out", "--verify")
    assert first.returncode == 0, first.stderr
    result = summary(zoo_dir / "out")["llama-fp32-cpu"]
    assert result["verify"] == "passed"
    assert result["parity"]["max_abs_error"] < 1e-4 and result["parity"]["top1_agreement"] == 1.0
    assert "passed: max-abs" in (zoo_dir / "out" / "summary.md").read_text()
    verify_log = Path(result["verify_log"])
    stamp = verify_log.stat().st_mtime_ns
    again = batch(zoo_dir, "zoo.yaml", "--out-root", "out", "--verify")
    assert again.returncode == 0
    resumed = summary(zoo_dir / "out")["llama-fp32-cpu"]
    assert resumed["status"] == "skipped" and resumed["parity"] == result["parity"]
    assert verify_log.stat().st_mtime_ns == stamp  # the stored figures were reused, not re-measured


def test_peak_rss_is_measured_per_child_while_children_run_in_parallel(tmp_path):
    big = [sys.executable, "-c", "import time; b = b'x' * (300 * 2**20); time.sleep(1.0)"]
    small = [sys.executable, "-c", "import time; time.sleep(1.0)"]
    results, children = {}, Children()

    def go(name, cmd):
        results[name] = run_child(cmd, tmp_path / f"{name}.log", children, timeout=60)

    threads = [threading.Thread(target=go, args=(n, c)) for n, c in (("big", big), ("small", small))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["big"][0] == results["small"][0] == 0
    assert results["big"][2] > 300 * 2**20
    # Neither the big sibling's peak (what RUSAGE_CHILDREN gives with parallel children) nor this pytest process's
    # (torch loaded: several hundred MiB), which a child forked straight from it would inherit in ru_maxrss.
    assert results["small"][2] < 60 * 2**20


def test_exit_codes_signals_and_missing_commands_come_through_the_launcher(tmp_path):
    children = Children()
    assert run_child([sys.executable, "-c", "raise SystemExit(4)"], tmp_path / "a.log", children, None)[0] == 4
    killed = run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                       tmp_path / "b.log", children, None)
    assert killed[0] == -9 and killed[2] is not None
    assert run_child([str(tmp_path / "no-such-program")], tmp_path / "c.log", children, None)[0] == 127
    assert (tmp_path / "a.log").read_text().startswith("$ ")


def test_only_that_outputs_temporary_folders_are_removed(tmp_path):
    mine = tmp_path / ".m-fp32-cpu.partial-4242-0a1b2c3d"
    other = tmp_path / ".m-fp32-cpu-2.partial-4243-0a1b2c3d"
    for folder in (mine, other):
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"\0" * 10)
    remove_partials(tmp_path, "m-fp32-cpu")
    assert not mine.exists() and other.exists()


# ------------------------------------------------------------------------------------------ zoo validation


def write_zoo(tmp_path: Path, text: str, name: str = "zoo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "recipes:\n  r: {precision: int4}\nmodels:\n  - model: org/a\n"


@pytest.mark.parametrize("text, expected", [
    ("recipes:\n  r: {precision: int4, extra_option: {}}\nmodels:\n  - model: org/a\n",
     ["recipes.r", "unknown key 'extra_option'", "Did you mean 'extra_options'?"]),
    ("recipes:\n  r: {precision: int3}\nmodels:\n  - model: org/a\n",
     ["models[0] (org/a), recipe r", "precision 'int3' is not supported"]),
    ("recipes:\n  r: {precision: int4, extra_options: {int4_blok_size: 64}}\nmodels:\n  - model: org/a\n",
     ["recipe r", "unknown extra option 'int4_blok_size'", "Did you mean 'int4_block_size'?"]),
    ("recipes:\n  r: {precision: int4, extra_options: {int4_block_size: 48}}\nmodels:\n  - model: org/a\n",
     ["recipe r", "int4_block_size='48' is not allowed"]),
    ("recipes:\n  r: {precision: bf16, ep: cpu}\nmodels:\n  - model: org/a\n",
     ["recipe r", "-p bf16 needs -e cuda"]),
    (BASE + "  - model: org/b\n    recipes: [r, q]\n", ["models[1] (org/b)", "unknown recipe 'q'"]),
    (BASE + "  - model: other/a\n", ["output name 'a-int4-cpu' is also produced by", "models[0]"]),
    ("name_template: '{model}-{precision}'\n" + BASE, ["name_template", "unknown field(s) 'model'"]),
    (BASE + "  - {model: org/c, verfy: true}\n", ["models[1]", "unknown key 'verfy'", "'verify'"]),
    ("recipes: {}\nmodels:\n  - model: org/a\n", ["'recipes' must be a non-empty mapping"]),
    ("models: []\n", ["missing required key 'recipes'"]),
    ("recipes: [oops\n", ["not valid YAML"]),
])
def test_zoo_errors_name_the_bad_entry(tmp_path, text, expected):
    with pytest.raises(UsageError) as exc:
        load_zoo(write_zoo(tmp_path, text))
    for fragment in expected:
        assert fragment in str(exc.value)


def test_a_bad_zoo_fails_before_any_export(tmp_path, capsys):
    path = write_zoo(tmp_path, BASE + "  - model: org/b\n    recipes: [int4]\n")
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(path), "--out-root", str(tmp_path / "out")])
    assert exc.value.code == 2 and "unknown recipe 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_entries_override_recipe_options_and_json_zoos_work(tmp_path):
    (tmp_path / "ckpt").mkdir()
    recipe = {"precision": "int4", "extra_options": {"int4_block_size": 32, "int4_algo_config": "rtn"}}
    data = {"recipes": {"q": recipe},
            "models": [{"model": "ckpt", "name": "local", "extra_options": ["int4_block_size=128"], "verify": True},
                       {"model": "org/remote-model"}]}
    zoo = load_zoo(write_zoo(tmp_path, json.dumps(data), "zoo.json"))
    local, remote = zoo.jobs
    assert local.name == "local-int4-cpu" and local.model == str((tmp_path / "ckpt").resolve())  # relative folder
    assert local.extra_args == ("int4_block_size=128", "int4_algo_config=rtn")
    assert local.resolved_extra["int4_block_size"] == 128 and local.verify
    assert remote.model == "org/remote-model" and remote.name == "remote-model-int4-cpu" and not remote.verify
    assert remote.resolved_extra["int4_block_size"] == 32 and remote.reference == "org/remote-model"


def test_example_zoo_is_valid_and_covers_the_three_families(capsys):
    zoo = load_zoo(REPO / "examples" / "zoo.yaml")
    models = {job.model for job in zoo.jobs}
    assert {"openai/gpt-oss-20b", "Qwen/Qwen3-30B-A3B", "google/gemma-3-1b-it"} <= models
    assert len({job.name for job in zoo.jobs}) == len(zoo.jobs)
    assert {(job.precision, job.ep) for job in zoo.jobs} >= {("int4", "cpu"), ("int4", "cuda"), ("bf16", "cuda")}
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(REPO / "examples" / "zoo.yaml"), "--dry-run"])
    assert exc.value.code == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == len(zoo.jobs) and listing[0].startswith("gpt-oss-20b-int4-cpu: -m openai/gpt-oss-20b")


def test_export_zoo_script_is_the_batch_command():
    script, zoo = REPO / "scripts" / "export_zoo.py", REPO / "examples" / "zoo.yaml"
    listing = subprocess.run([sys.executable, str(script), str(zoo), "--dry-run"], capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "gemma-3-1b-it-fp32-cpu: -m google/gemma-3-1b-it -p fp32 -e cpu" in listing.stdout.splitlines()


def test_verify_flag_precedence(tmp_path):
    text = ("verify: true\nrecipes:\n  r: {precision: fp32}\n  s: {precision: int4, verify: false}\n"
            "models:\n  - model: org/a\n  - {model: org/b, verify: false}\n")
    path = write_zoo(tmp_path, text)
    by_name = lambda zoo: {job.name: job.verify for job in zoo.jobs}  # noqa: E731
    assert by_name(load_zoo(path)) == {"a-fp32-cpu": True, "a-int4-cpu": False, "b-fp32-cpu": False,
                                       "b-int4-cpu": False}
    assert by_name(load_zoo(path, verify=True)) == by_name(load_zoo(path))  # opt-outs stay out
    assert not any(by_name(load_zoo(path, verify=False)).values())  # --no-verify: off everywhere
    assert by_name(load_zoo(write_zoo(tmp_path, text.replace("verify: true\n", "", 1)))) == {
        "a-fp32-cpu": False, "a-int4-cpu": False, "b-fp32-cpu": False, "b-int4-cpu": False}


def test_a_stored_verification_is_reused_only_for_the_same_settings(tmp_path):
    output = tmp_path / "a-fp32-cpu"
    output.mkdir()
    (output / "ortbuild.json").write_text("{}")
    job = load_zoo(write_zoo(tmp_path, "recipes:\n  r: {precision: fp32}\nmodels:\n  - model: org/a\n")).jobs[0]
    stored = tmp_path / "a.verify.json"
    stored.write_text(json.dumps({"tolerance": 1e-3, "min_top1": None, "steps": 8, "reference": "org/a"}))
    assert stored_verification_applies(stored, output, job)
    for changed in ({"tolerance": 0.5}, {"steps": 2}, {"reference": "org/other"}):
        stored.write_text(json.dumps({"tolerance": 1e-3, "min_top1": None, "steps": 8, "reference": "org/a",
                                      **changed}))
        assert not stored_verification_applies(stored, output, job)
    stored.write_text(json.dumps({"tolerance": 1e-3, "min_top1": None, "steps": 8, "reference": "org/a"}))
    os.utime(output / "ortbuild.json", (stored.stat().st_mtime + 10,) * 2)  # output re-exported since
    assert not stored_verification_applies(stored, output, job)
