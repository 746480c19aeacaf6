"""The pipeline as a user drives it: `dvc repro`, `dvc exp run -S`, `dvc exp show`, `dvc metrics diff`,
`dvc plots diff`, in a temporary git repository with a tiny CPU model and a loopback corpus server.

Each test asserts which stages DVC ran and which it skipped, from its own log lines:
`Running stage 'x':` and `Stage 'x' didn't change, skipping`. The validate stage reruns whenever a param changes:
it checks params.yaml before any other stage runs.
"""

import ast
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from conftest import (
    PROJECT_ROOT,
    STAGES,
    LoopbackServer,
    commit,
    dvc,
    git,
    output,
    ran_stages,
    restored_stages,
    run,
    skipped_stages,
    snapshot,
    tool_env,
    workspace_params,
)

OUTPUTS = (
    "data/input.txt",
    "data/train.pt",
    "data/val.pt",
    "data/vocab.json",
    "out/ckpt.pt",
    "out/samples.txt",
    "metrics/train.json",
    "metrics/sample.json",
    "metrics/train_loss.tsv",
    "metrics/val_loss.tsv",
)
TRAIN_SUMMARY_KEYS = {"best_val_loss", "best_val_bpc", "steps", "tokens_per_sec", "wall_time_s", "num_params"}


def assert_stages(result: subprocess.CompletedProcess[str], ran: set[str]) -> None:
    """DVC ran exactly `ran` and reported every other stage as unchanged."""
    log = output(result)
    assert ran_stages(result) == ran, log
    assert skipped_stages(result) == set(STAGES) - ran, log
    assert not restored_stages(result), log


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def locked_md5(project: Path, stage: str, path: str) -> str:
    """The md5 that dvc.lock records for `stage`'s output `path`."""
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def best_val_loss(project: Path) -> float:
    return json.loads((project / "metrics/train.json").read_text(encoding="utf-8"))["best_val_loss"]


@pytest.mark.slow
def test_repro_runs_every_stage_then_skips_them_all(project: Path, loopback_server: LoopbackServer) -> None:
    downloads = len(loopback_server.requests)

    first = dvc(project, "repro")

    assert_stages(first, set(STAGES))
    assert len(loopback_server.requests) == downloads + 1
    for name in OUTPUTS:
        assert (project / name).is_file(), f"{name} missing after dvc repro"
    summary = json.loads((project / "metrics/train.json").read_text(encoding="utf-8"))
    assert TRAIN_SUMMARY_KEYS <= summary.keys()
    assert summary["steps"] == 30
    vocab_size = len(json.loads((project / "data/vocab.json").read_text(encoding="utf-8"))["chars"])
    assert summary["best_val_loss"] < math.log(vocab_size)  # better than a uniform guess
    val_rows = read_tsv(project / "metrics/val_loss.tsv")
    assert [int(r["step"]) for r in val_rows] == [10, 20, 30]
    assert float(val_rows[-1]["val_loss"]) < float(val_rows[0]["val_loss"])
    assert len(read_tsv(project / "metrics/train_loss.tsv")) == 30
    assert {"tokens_per_sec", "num_tokens"} <= json.loads(
        (project / "metrics/sample.json").read_text(encoding="utf-8")
    ).keys()
    assert (project / "out/samples.txt").read_text(encoding="utf-8").strip()

    second = dvc(project, "repro")

    assert_stages(second, set())
    assert len(loopback_server.requests) == downloads + 1


@pytest.mark.slow
def test_sample_param_reruns_only_sample(reproduced_project: Path) -> None:
    samples = (reproduced_project / "out/samples.txt").read_text(encoding="utf-8")

    result = dvc(reproduced_project, "exp", "run", "-S", "sample.temperature=0.5")

    assert_stages(result, {"validate", "sample", "export"})  # export: generation_config.json
    assert (reproduced_project / "out/samples.txt").read_text(encoding="utf-8") != samples


@pytest.mark.slow
@pytest.mark.parametrize("override", ["train.learning_rate=0.002", "model.n_layer=1"])
def test_train_or_model_param_reruns_train_and_sample(reproduced_project: Path, override: str) -> None:
    result = dvc(reproduced_project, "exp", "run", "-S", override)

    assert_stages(result, {"validate", "train", "sample", "export"})


@pytest.mark.slow
def test_encode_param_reruns_everything_but_download(reproduced_project: Path) -> None:
    val_tokens = (reproduced_project / "data/val.pt").stat().st_size

    result = dvc(reproduced_project, "exp", "run", "-S", "encode.val_fraction=0.2")

    assert_stages(result, {"validate", "encode", "train", "sample", "export"})
    assert (reproduced_project / "data/val.pt").stat().st_size > val_tokens


# A bad value in each section of params.yaml, set as a user does with `dvc exp run -S`, and an emptied params.yaml;
# each with what its one-line error says.
BAD_PARAMS = {
    "data": (["-S", "data.timeout=0"], "data.timeout must be greater than 0, got 0.0"),
    "encode": (["-S", "encode.val_fraction=1.5"], "encode.val_fraction must be less than 1, got 1.5"),
    "model": (["-S", "model.n_head=5"], "model.n_embd (32) must be divisible by model.n_head (5)"),
    "train": (["-S", "train.batch_size=0"], "train.batch_size must be greater than or equal to 1, got 0"),
    "sample": (
        ["-S", "sample.top_k=abc"],
        "sample.top_k must be a valid integer, got 'abc' (keep the k likeliest tokens; null: off)",
    ),
    "empty params.yaml": ([], "params.yaml must hold a mapping of sections"),
    # values that pass the types but cannot work, as `-S` writes them: '' for an empty value, .inf and .nan
    "empty prompt": (["-S", "sample.prompt="], "sample.prompt is empty, got ''"),
    "infinite learning rate": (
        ["-S", "train.learning_rate=inf"],
        "train.learning_rate must be a finite number, got inf",
    ),
    "nan weight decay": (["-S", "train.weight_decay=nan"], "train.weight_decay must be a finite number, got nan"),
    "infinite timeout": (["-S", "data.timeout=inf"], "data.timeout must be a finite number, got inf"),
    "temperature too small to divide by": (
        ["-S", "sample.temperature=1e-40"],
        "sample.temperature must be 0 (greedy) or at least 0.0001, got 1e-40: use 0 for greedy",
    ),
}


def assert_stopped_by_validate(result: subprocess.CompletedProcess[str], message: str) -> None:
    """The experiment failed in the validate stage, with one `error: ...` line that says `message`."""
    log = output(result)
    assert result.returncode != 0, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], log
    assert ran_stages(result) == {"validate"}, log


def assert_nothing_to_rerun(project: Path) -> None:
    """`dvc status` is clean and `dvc repro` runs nothing."""
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
    assert_stages(dvc(project, "repro"), set())


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_PARAMS)
def test_bad_params_fail_the_experiment_before_dvc_deletes_any_output(reproduced_project: Path, case: str) -> None:
    project = reproduced_project
    args, message = BAD_PARAMS[case]
    if not args:
        (project / "params.yaml").write_text("", encoding="utf-8")
    last_good_run = snapshot(project)

    result = dvc(project, "exp", "run", *args, check=False)

    assert_stopped_by_validate(result, message)
    assert snapshot(project) == last_good_run, "an output of the last good run was changed or deleted"
    git(project, "checkout", "params.yaml")
    assert_nothing_to_rerun(project)


@pytest.mark.slow
def test_bad_params_fail_a_targeted_experiment_with_a_frozen_download_stage(reproduced_project: Path) -> None:
    """`dvc freeze download` (working offline) cuts download off from the stages before it; train still depends on
    the validate stage, so `dvc exp run train` checks the params before DVC deletes train's outputs."""
    project = reproduced_project
    dvc(project, "freeze", "download")
    commit(project, "download frozen")
    last_good_run = snapshot(project)

    result = dvc(project, "exp", "run", "train", "-S", "train.batch_size=0", check=False)

    assert_stopped_by_validate(result, "train.batch_size must be greater than or equal to 1, got 0")
    assert snapshot(project) == last_good_run, "an output of the last good run was changed or deleted"


@pytest.mark.slow
def test_code_change_in_training_reruns_train_not_data_stages(reproduced_project: Path) -> None:
    checkpoint = locked_md5(reproduced_project, "train", "out/ckpt.pt")
    with (reproduced_project / "nanogpt/optim.py").open("a", encoding="utf-8") as f:
        f.write("# a change only the train stage depends on\n")

    result = dvc(reproduced_project, "repro")

    # Seeded CPU training usually rewrites a byte-identical checkpoint after a comment-only change, and DVC then
    # rightly skips sample; whichever happens, sample must follow the checkpoint. The training summary's timings
    # change either way, and export reads it.
    resampled = locked_md5(reproduced_project, "train", "out/ckpt.pt") != checkpoint
    assert_stages(result, {"train", "sample", "export"} if resampled else {"train", "export"})


@pytest.mark.slow
def test_experiments_compare_in_show_metrics_diff_and_plots(reproduced_project: Path, tmp_path: Path) -> None:
    project = reproduced_project
    baseline = best_val_loss(project)
    dvc(project, "exp", "run", "-n", "lr-2e-3", "-S", "train.learning_rate=0.002")
    lr_2e3 = best_val_loss(project)

    # the workspace holds the last experiment's results; HEAD holds the committed baseline
    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)["metrics/train.json"]["best_val_loss"]
    assert (diff["old"], diff["new"]) == (baseline, lr_2e3)
    assert diff["diff"] == pytest.approx(lr_2e3 - baseline)
    assert lr_2e3 != baseline

    dvc(project, "exp", "run", "-n", "lr-3e-3", "-S", "train.learning_rate=0.003")
    lr_3e3 = best_val_loss(project)

    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    experiments = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                experiments[rev["name"]] = rev["data"]
    assert experiments.keys() == {"lr-2e-3", "lr-3e-3"}
    for name, lr, loss in (("lr-2e-3", 0.002, lr_2e3), ("lr-3e-3", 0.003, lr_3e3)):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == lr
        assert data["metrics"]["metrics/train.json"]["data"]["best_val_loss"] == loss

    diff = json.loads(dvc(project, "metrics", "diff", "lr-2e-3", "lr-3e-3", "--json").stdout)
    assert diff["metrics/train.json"]["best_val_loss"]["old"] == lr_2e3
    assert diff["metrics/train.json"]["best_val_loss"]["new"] == lr_3e3

    plots = tmp_path / "plots"
    dvc(project, "plots", "diff", "lr-2e-3", "lr-3e-3", "-o", str(plots))
    html = (plots / "index.html").read_text(encoding="utf-8")
    assert "Train and validation loss" in html
    for rev in ("lr-2e-3", "lr-3e-3"):
        assert f'"rev": "{rev}"' in html

    # what a user keeps: the better experiment, applied and committed
    best = "lr-2e-3" if lr_2e3 < lr_3e3 else "lr-3e-3"
    dvc(project, "exp", "apply", best)
    commit(project, f"apply {best}")
    assert best_val_loss(project) == min(lr_2e3, lr_3e3)
    assert dvc(project, "metrics", "diff", "--json").stdout.strip() in ("", "{}")
    assert git(project, "status", "--porcelain").stdout == ""


def _stage_modules(stage: str) -> list[str]:
    """Project files (relative paths) that `import stages.<stage>` loads, as the stage's own process sees it."""
    code = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
        "print(json.dumps([m.__file__ for n, m in sys.modules.items() "
        "if n.split('.')[0] in ('nanogpt', 'stages') and getattr(m, '__file__', None)]))"
    )
    result = subprocess.run(
        [sys.executable, "-B", "-c", code, f"stages.{stage}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(Path(f).resolve().relative_to(PROJECT_ROOT).as_posix() for f in json.loads(result.stdout))


def _is_docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_code_deps_are_complete(stage: str) -> None:
    pipeline = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    deps = set(pipeline["stages"][stage]["deps"])
    loaded = _stage_modules(stage)

    assert f"stages/{stage}.py" in loaded
    # package __init__ files are not listed; that is safe only while they hold no code
    missing = [
        f for f in loaded if f not in deps and not (f.endswith("__init__.py") and _is_docstring_only(PROJECT_ROOT / f))
    ]
    assert not missing, f"dvc.yaml stage {stage!r} does not list code it imports: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_names_its_files_in_its_cmd(stage: str) -> None:
    """dvc.yaml alone shows the data flow: each file a stage reads or writes, other than its code, is a word of its
    cmd, or the folder that holds it is (train's --data data); no stage relies on a path its code chooses."""
    spec = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    words = set(spec["cmd"].split())
    # out/params.ok orders a stage after validate; the stage does not read it
    paths = [dep for dep in spec["deps"] if not dep.endswith(".py") and dep != "out/params.ok"]
    for kind in ("outs", "metrics", "plots"):
        paths += [next(iter(out)) if isinstance(out, dict) else out for out in spec.get(kind, [])]

    unnamed = [path for path in paths if not {path, *map(str, PurePosixPath(path).parents)} & words]
    assert not unnamed, f"dvc.yaml stage {stage!r} does not name {unnamed} in its cmd"


@pytest.mark.slow
def test_an_experiment_identical_to_an_earlier_one_restores_train_from_the_run_cache(reproduced_project: Path) -> None:
    project = reproduced_project
    summary = (project / "metrics/train.json").read_text(encoding="utf-8")
    seed = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))["train"]["seed"]
    dvc(project, "exp", "run", "-S", f"train.seed={seed + 1}")

    result = dvc(project, "exp", "run", "-S", f"train.seed={seed}")

    assert "train" in restored_stages(result) and "train" not in ran_stages(result), output(result)
    assert (project / "metrics/train.json").read_text(encoding="utf-8") == summary
    assert (project / "metrics/val_loss.tsv").is_file() and (project / "out/ckpt.pt").is_file()


# ---------------------------------------------------------------- what the README says about experiments


def readme_block(after: str) -> list[str]:
    """The commands of the README's first bash block after the line `after`, comments removed."""
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(after, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines()]


def _number_or_text(value: object) -> object:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value


def _flat(params: dict) -> dict[str, object]:
    return {f"{section}.{key}": _number_or_text(v) for section, keys in params.items() for key, v in keys.items()}


@pytest.mark.defaults  # reads the workspace's params.yaml as the shipped defaults
@pytest.mark.parametrize("quick_start", ["gpu", "cpu"])
def test_readme_examples_change_what_they_set_after_either_quick_start(quick_start: str) -> None:
    """Run in order from the state a quick start leaves (params.yaml's defaults, or those with configs/cpu.args),
    every `-S key=value` of the README's examples sets a new value: none is a no-op that reruns nothing."""
    state = _flat(yaml.safe_load(workspace_params().read_text(encoding="utf-8")))
    if quick_start == "cpu":
        cpu_args = (PROJECT_ROOT / "configs/cpu.args").read_text(encoding="utf-8").split()
        state.update((k, _number_or_text(v)) for k, v in (a.split("=", 1) for a in cpu_args if a != "-S"))
    baseline = dict(state)
    commands = readme_block("## Working with DVC")
    assert any(" -S " in command for command in commands)

    for command in commands:
        if command == "dvc exp apply HEAD":
            state = dict(baseline)
        words = command.split()
        for key, values in (words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-S"):
            for value in values.split(","):  # a queued grid: each value one experiment
                assert _number_or_text(value) != state[key], f"{command!r} leaves {key} at {state[key]}"
            if "--queue" not in words:  # queued runs leave the workspace alone
                state[key] = _number_or_text(values)


@pytest.mark.slow
def test_readme_exp_show_command_leaves_out_the_hash_columns_and_keeps_metrics_and_changed_params(
    reproduced_project: Path,
) -> None:
    (command,) = [c for c in readme_block("## Working with DVC") if c.startswith("dvc exp show")]
    project = reproduced_project
    dvc(project, "exp", "run", "-S", "train.learning_rate=0.003")
    env = {**tool_env(project), "COLUMNS": "1000"}  # wide enough that no column is folded away

    def show(args: str) -> str:
        bash = ["bash", "-c", f"{sys.executable} -m {args}"]
        return subprocess.run(bash, cwd=project, env=env, capture_output=True, text=True, check=True).stdout

    md5 = re.compile(r"\b[0-9a-f]{32}\b")  # a hash column's value
    assert md5.search(show("dvc exp show --csv"))  # without the flags, the hashes are there
    table = show(command)
    assert not md5.search(table), table
    header = table.splitlines()[1].split()
    assert {"best_val_loss", "best_val_bpc", "train.learning_rate"} <= set(header), table
    assert not any(name.startswith(("data/", "nanogpt/", "stages/", "out/")) for name in header), table
    assert "train.batch_size" not in header  # the same in every row


@pytest.mark.slow
def test_quick_start_experiment_stays_in_the_workspace_until_applied_back_or_committed(project: Path) -> None:
    """What the README says the CPU quick start leaves, and the commands it gives to undo or keep it, on a fresh
    clone (nothing committed but the code and params)."""
    committed = (project / "params.yaml").read_text(encoding="utf-8")
    dvc(project, "exp", "run", "-n", "cpu", "-S", "train.learning_rate=0.002", "-S", "model.n_layer=1")

    assert git(project, "status", "--porcelain", "params.yaml", "dvc.lock").stdout.splitlines() == [
        " M params.yaml",
        "?? dvc.lock",
    ]
    dvc(project, "exp", "apply", "HEAD")  # back to the defaults
    assert (project / "params.yaml").read_text(encoding="utf-8") == committed
    assert (project / "dvc.lock").exists()  # the run's results stay until `dvc repro`

    dvc(project, "exp", "apply", "cpu")
    run(project, "bash", "-c", 'git add -A && git commit -m "CPU configuration"')  # keep it, as the README says
    assert git(project, "status", "--porcelain").stdout == ""
    assert "up to date" in dvc(project, "status").stdout
    checkpoint = (project / "out/ckpt.pt").read_bytes()

    dvc(project, "exp", "run", "-S", "train.learning_rate=0.003")
    assert git(project, "status", "--porcelain").stdout != ""
    dvc(project, "exp", "apply", "HEAD")  # after a commit, everything comes back

    assert git(project, "status", "--porcelain").stdout == ""
    assert "up to date" in dvc(project, "status").stdout
    assert (project / "out/ckpt.pt").read_bytes() == checkpoint
