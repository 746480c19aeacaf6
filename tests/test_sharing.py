"""Sharing what was trained, as the README's "Sharing" section tells a user: a DVC remote (a local folder here) and a
git `origin` (a bare repository), `dvc push` / `dvc pull`, `dvc exp push` / `dvc exp pull`, and the model registry's
`dvc artifacts get` of the checkpoint and of its Hugging Face export. No network: every remote is a folder.
"""

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import commit, copy_project, dvc, git, run_stage

ARTIFACT = "shakespeare-gpt"  # dvc.yaml's artifacts section: the checkpoint
HF_ARTIFACT = "shakespeare-gpt-hf"  # and the export stage's out/hf/


class Shared(NamedTuple):
    project: Path  # where the model was trained and pushed from
    origin: Path  # the bare git repository
    clone: Path  # another clone of origin, after `dvc pull`


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, _reproduced_template: Path) -> Shared:
    """The session's reproduced project with a local-folder DVC remote, pushed to a bare `origin`, cloned, pulled."""
    root = tmp_path_factory.mktemp("sharing")
    project = copy_project(_reproduced_template, root / "project")
    dvc(project, "remote", "add", "-d", "storage", str(root / "dvc-storage"))
    commit(project, "a DVC remote")
    dvc(project, "push")
    git(root, "init", "-q", "--bare", "--initial-branch=main", str(root / "origin.git"))
    git(project, "remote", "add", "origin", str(root / "origin.git"))
    git(project, "push", "-q", "origin", "main")
    git(root, "clone", "-q", str(root / "origin.git"), str(root / "clone"))
    dvc(root / "clone", "pull")
    return Shared(project, root / "origin.git", root / "clone")


@pytest.mark.slow
def test_a_clone_pulls_the_outputs_and_samples_the_same_text(shared: Shared) -> None:
    for name in ("out/ckpt.pt", "data/vocab.json", "out/hf/model.safetensors", "out/hf/README.md"):
        assert md5(shared.clone / name) == md5(shared.project / name), name
    assert not (shared.clone / "out/resume").exists()  # resume state is the trainer's, not shared

    run_stage(shared.clone, "sample", "--vocab", "data/vocab.json", "--output", "resampled.txt")

    assert (shared.clone / "resampled.txt").read_text() == (shared.project / "out/samples.txt").read_text()


@pytest.mark.slow
def test_an_experiment_pushed_from_one_clone_is_applied_in_another(shared: Shared) -> None:
    dvc(shared.project, "exp", "run", "-n", "lr-2e-3", "-S", "train.learning_rate=0.002")
    checkpoint = md5(shared.project / "out/ckpt.pt")
    dvc(shared.project, "exp", "push", "origin", "lr-2e-3")

    dvc(shared.clone, "exp", "pull", "origin", "lr-2e-3")
    shown = json.loads(dvc(shared.clone, "exp", "show", "--json").stdout)
    names = {rev["name"] for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]}
    assert "lr-2e-3" in names
    dvc(shared.clone, "exp", "apply", "lr-2e-3")
    dvc(shared.clone, "pull")

    assert md5(shared.clone / "out/ckpt.pt") == checkpoint
    assert "learning_rate: 0.002" in (shared.clone / "params.yaml").read_text()


@pytest.mark.slow
def test_artifacts_get_fetches_a_registered_version_of_the_model(
    shared: Shared, _reproduced_template: Path, tmp_path: Path
) -> None:
    # registering a version is an annotated git tag <name>@v<semver>, which `gto register` writes
    git(shared.project, "tag", "-a", f"{ARTIFACT}@v0.1.0", "-m", "the tiny model", "main")
    git(shared.project, "push", "-q", "origin", f"{ARTIFACT}@v0.1.0")
    elsewhere = tmp_path / "elsewhere"  # not a clone: dvc reads the repo at origin and the remote its config names
    elsewhere.mkdir()

    dvc(elsewhere, "artifacts", "get", str(shared.origin), ARTIFACT, "-o", "model.pt")

    assert md5(elsewhere / "model.pt") == md5(_reproduced_template / "out/ckpt.pt")  # main's checkpoint


@pytest.mark.slow
def test_artifacts_get_fetches_the_hugging_face_folder_that_transformers_loads(
    shared: Shared, _reproduced_template: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    git(shared.project, "tag", "-a", f"{HF_ARTIFACT}@v0.1.0", "-m", "the tiny model for transformers", "main")
    git(shared.project, "push", "-q", "origin", f"{HF_ARTIFACT}@v0.1.0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    dvc(elsewhere, "artifacts", "get", str(shared.origin), HF_ARTIFACT, "-o", "hf")

    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert md5(elsewhere / "hf" / name) == md5(_reproduced_template / "out/hf" / name), name  # main's export
    model = transformers.AutoModelForCausalLM.from_pretrained(elsewhere / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(elsewhere / "hf")
    assert model.config.num_hidden_layers == 2 and tokenizer.decode(tokenizer("ROMEO:")["input_ids"]) == "ROMEO:"
