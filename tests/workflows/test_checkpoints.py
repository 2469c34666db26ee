"""Orphaned checkpoint folders: a kill between a worker persisting a checkpoint and Ray Train's controller recording
it leaves a folder that Ray neither resumes from nor removes. The driver deletes such folders before a cell's
fit(), and only those. (The resume tests read Ray Train's real record; here it is written by hand, with the keys
the driver reads, to reach every case.)"""
import json

from workflows.driver.launch import RAY_TRAIN_SNAPSHOT, prune_orphaned_checkpoints, registered_checkpoints


def folders(run_dir, *names):
    for name in names:
        (run_dir / name / "model").mkdir(parents=True)


def snapshot(run_dir, registered, pending=(), latest=None):
    record = {"checkpoint_results": [{"checkpoint_dir_name": n} for n in registered],
              "pending_training_results": [{"checkpoint_dir_name": n} for n in pending],
              "latest_checkpoint_result": {"checkpoint_dir_name": latest} if latest else None}
    (run_dir / RAY_TRAIN_SNAPSHOT).write_text(json.dumps(record))


def left(run_dir):
    return {p.name for p in run_dir.iterdir() if p.is_dir()}


def test_checkpoint_folders_ray_train_never_registered_are_pruned(tmp_path):
    folders(tmp_path, "checkpoint_a", "checkpoint_b", "checkpoint_c", "checkpoint_d", "not_a_checkpoint")
    snapshot(tmp_path, ["checkpoint_a"], pending=["checkpoint_b"], latest="checkpoint_c")
    assert registered_checkpoints(str(tmp_path)) == {"checkpoint_a", "checkpoint_b", "checkpoint_c"}
    assert prune_orphaned_checkpoints(str(tmp_path)) == ["checkpoint_d"]
    assert left(tmp_path) == {"checkpoint_a", "checkpoint_b", "checkpoint_c", "not_a_checkpoint"}


def test_with_no_record_every_checkpoint_folder_is_an_orphan_and_the_cell_starts_from_zero(tmp_path):
    """A kill before Ray Train registered the first checkpoint: nothing to resume from, so nothing is kept."""
    folders(tmp_path, "checkpoint_a")
    assert registered_checkpoints(str(tmp_path)) == set()
    assert prune_orphaned_checkpoints(str(tmp_path)) == ["checkpoint_a"] and left(tmp_path) == set()


def test_an_unreadable_record_deletes_nothing(tmp_path):
    """A record in a format this code does not know (a Ray upgrade) must not cost a checkpoint Ray would resume."""
    folders(tmp_path, "checkpoint_a")
    (tmp_path / RAY_TRAIN_SNAPSHOT).write_text(json.dumps({"format": 2}))
    assert registered_checkpoints(str(tmp_path)) is None
    assert prune_orphaned_checkpoints(str(tmp_path)) == [] and left(tmp_path) == {"checkpoint_a"}
