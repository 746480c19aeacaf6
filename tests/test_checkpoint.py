"""The best-val checkpoint and the resume state: exact round trips, one-line errors for bad files."""

import os

import pytest
import torch

from conftest import tiny_config
from nanogpt.checkpoint import ResumeState, ResumeStore, load_checkpoint, resume_key, save_checkpoint
from nanogpt.errors import UserError
from nanogpt.model import GPT
from nanogpt.tokenizer import CharTokenizer

TINY = tiny_config(
    {"model.block_size": 8, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16, "model.dropout": 0.1}
).model
TOKENIZER = CharTokenizer.fit("\n abcdefghij")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY, TOKENIZER.vocab_size)
    path = tmp_path / "out" / "model.pt"
    save_checkpoint(path, model, TOKENIZER, step=42, val_loss=1.25)
    return path, model.eval()


def test_round_trip_gives_identical_logits(checkpoint):
    path, model = checkpoint
    x = torch.tensor([TOKENIZER.encode("abc\nhij")])

    loaded, tokenizer, info = load_checkpoint(path)

    assert not loaded.training
    assert loaded.cfg == TINY
    assert torch.equal(loaded(x)[0], model(x)[0])
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied after loading
    assert tokenizer.to_dict() == TOKENIZER.to_dict()
    assert info == {"step": 42, "val_loss": 1.25}


def test_truncated_checkpoint_is_a_user_error_naming_the_file(checkpoint):
    path, _ = checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])

    with pytest.raises(UserError) as info:
        load_checkpoint(path)

    assert str(path) in str(info.value)


def test_foreign_file_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save([1, 2, 3], path)

    with pytest.raises(UserError) as info:
        load_checkpoint(path)

    assert str(path) in str(info.value) and "not a checkpoint of this project" in str(info.value)


def test_checkpoint_of_another_model_shape_is_a_user_error(checkpoint):
    path, _ = checkpoint
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["n_embd"] = 32
    torch.save(ckpt, path)

    with pytest.raises(UserError, match="does not match the model code"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "model.pt")


def test_resume_key_changes_with_params_and_data(tmp_path):
    data = tmp_path / "train.pt"
    data.write_bytes(b"tokens")
    key = resume_key({"lr": 1e-3}, [data])

    assert resume_key({"lr": 1e-3}, [data]) == key
    assert resume_key({"lr": 2e-3}, [data]) != key
    data.write_bytes(b"other tokens")
    assert resume_key({"lr": 1e-3}, [data]) != key


def resume_state(key: str, step: int) -> ResumeState:
    """A small but complete resume state."""
    rng = torch.get_rng_state()
    return ResumeState(
        key, step, 1.5, step, {"train_rows": [], "val_rows": []}, 2.0, {"weights": torch.arange(4.0)}, [], {}, rng, rng
    )


def test_resume_state_round_trip(tmp_path, checkpoint):
    best, _ = checkpoint
    store = ResumeStore(tmp_path / "resume", "k1")
    state = resume_state("k1", 7)

    store.save(state, best)
    loaded, reason = store.load()

    assert loaded.step == 7 and torch.equal(loaded.model["weights"], state.model["weights"])
    assert "resuming from step 7" in reason


def test_resume_state_missing_a_key_starts_from_step_0(tmp_path):
    store = ResumeStore(tmp_path / "resume", "k1")
    state = resume_state("k1", 7).to_dict()
    del state["batch_rng"]
    store.state_path.parent.mkdir(parents=True)
    torch.save(state, store.state_path)

    loaded, reason = store.load()

    assert loaded is None
    assert "incomplete" in reason and "step 0" in reason


def test_resume_state_with_another_key_is_not_used(tmp_path):
    ResumeStore(tmp_path / "resume", "k1").save(resume_state("k1", 7), None)

    loaded, reason = ResumeStore(tmp_path / "resume", "k2").load()

    assert loaded is None
    assert "other params" in reason


def test_no_resume_state_starts_from_step_0(tmp_path):
    loaded, reason = ResumeStore(tmp_path / "resume", "k1").load()

    assert loaded is None and "step 0" in reason


def test_corrupt_resume_state_starts_from_step_0(tmp_path):
    store = ResumeStore(tmp_path / "resume", "k1")
    store.save(resume_state("k1", 7), None)
    store.state_path.write_bytes(b"garbage")

    loaded, reason = store.load()

    assert loaded is None
    assert str(store.state_path) in reason and "step 0" in reason


def test_restore_checkpoint_puts_the_best_back(tmp_path, checkpoint):
    best, _ = checkpoint
    content = best.read_bytes()
    store = ResumeStore(tmp_path / "resume", "k1")
    store.save(resume_state("k1", 7), best)
    os.remove(best)  # as `dvc repro` does with a stage's outputs

    store.restore_checkpoint(best)

    assert best.read_bytes() == content


def test_clear_removes_the_folder(tmp_path, checkpoint):
    best, _ = checkpoint
    store = ResumeStore(tmp_path / "resume", "k1")
    store.save(resume_state("k1", 7), best)

    store.clear()

    assert not store.folder.exists() and not (tmp_path / "resume").exists()
    assert best.exists()  # the checkpoint itself is not the store's to delete
    assert store.load()[0] is None


def test_a_finished_run_leaves_the_state_of_an_interrupted_one(tmp_path, checkpoint):
    """Run A is interrupted, run B (other params) runs to the end: A's state and best checkpoint still wait for it."""
    best, _ = checkpoint
    content = best.read_bytes()
    interrupted = ResumeStore(tmp_path / "resume", "a")
    interrupted.save(resume_state("a", 7), best)
    finished = ResumeStore(tmp_path / "resume", "b")
    finished.save(resume_state("b", 3), None)
    os.remove(best)  # B's checkpoint replaces it (dvc deletes the output, a save renames a new file into place)
    best.write_bytes(b"run b's checkpoint")

    finished.clear()
    loaded, reason = interrupted.load()

    assert loaded is not None and loaded.step == 7 and "resuming from step 7" in reason
    interrupted.restore_checkpoint(best)
    assert best.read_bytes() == content  # A's best, not B's


def test_only_the_newest_states_are_kept(tmp_path):
    root = tmp_path / "resume"
    for i, key in enumerate(["k1", "k2", "k3", "k4"]):
        ResumeStore(root, key).save(resume_state(key, i + 1), None)
        os.utime(ResumeStore(root, key).state_path, (1000 + i, 1000 + i))  # saved in this order

    kept = {key for key in ("k1", "k2", "k3", "k4") if ResumeStore(root, key).load()[0] is not None}

    assert kept == {"k2", "k3", "k4"} and ResumeStore.KEEP == 3
    assert len(list(root.iterdir())) == 3


def test_saving_removes_the_files_of_the_earlier_flat_layout(tmp_path):
    root = tmp_path / "resume"
    root.mkdir()
    (root / "state.pt").write_bytes(b"old")
    (root / "best.pt").write_bytes(b"old")

    ResumeStore(root, "k1").save(resume_state("k1", 1), None)

    assert [p.name for p in root.iterdir()] == [ResumeStore(root, "k1").folder.name]
