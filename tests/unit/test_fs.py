"""gm.fs: two writers of one file (two ranks writing the compile cache's signature) each publish
their own temporary; the last to finish wins and nothing is left behind."""

from gm.fs import atomic_path, atomic_write_text


def test_two_writers_of_one_file_do_not_collide(tmp_path):
    target = tmp_path / "train_step_signature.json"
    with atomic_path(target) as first:
        first.write_text("first", encoding="utf-8")
        atomic_write_text(target, "second")  # another writer finishes while the first is open
        assert target.read_text(encoding="utf-8") == "second"
    assert target.read_text(encoding="utf-8") == "first"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
