"""The one stage cache every stage uses: reuse by key, atomic save, resume, invalidation."""

import pytest

from exporter.run.stage import KEY_FILE, STAGE_NAMES, STAGES, Stage, invalidate, method_stage


def test_a_stage_is_reused_only_with_its_key_and_every_output(tmp_path):
    stage = Stage("probe", 3, ("probe.json", "probe.png"))
    key = stage.key("model", {"layer": "auto"})
    assert key == stage.key("model", {"layer": "auto"}) and key != stage.key("model", {"layer": 2})
    assert key != Stage("probe", 4).key("model", {"layer": "auto"})  # a new version is a new key
    assert stage.cached(tmp_path, key) is None and stage.stored_key(tmp_path) == ""
    with stage.saving(tmp_path, key) as tmp:
        (tmp / "probe.json").write_text("{}")
        (tmp / "probe.png").write_bytes(b"png")
    assert stage.cached(tmp_path, key) == tmp_path / "probe"
    assert (tmp_path / "probe" / KEY_FILE).read_text() == key
    assert stage.cached(tmp_path, stage.key("other")) is None
    (tmp_path / "probe" / "probe.png").unlink()  # an output lost: computed again
    assert stage.cached(tmp_path, key) is None


def test_an_interrupted_save_leaves_the_finished_stage_as_it_was(tmp_path):
    stage = Stage("sae", 1, ("weights",))
    with stage.saving(tmp_path, "k1") as tmp:
        (tmp / "weights").write_text("first")
    with pytest.raises(KeyboardInterrupt):
        with stage.saving(tmp_path, "k2") as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (tmp_path / "sae" / "weights").read_text() == "first"
    assert stage.cached(tmp_path, "k1") and not stage.cached(tmp_path, "k2")
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written beside it
    with stage.saving(tmp_path, "k2") as tmp:  # the next run resumes: it computes k2 again
        (tmp / "weights").write_text("second")
    assert (tmp_path / "sae" / "weights").read_text() == "second" and stage.cached(tmp_path, "k2")


def test_forgetting_removes_outputs_and_scratch(tmp_path):
    stage = Stage("sae", 1, ("weights",), scratch=("sae-checkpoint",))
    with stage.saving(tmp_path, "k") as tmp:
        (tmp / "weights").write_text("w")
    (tmp_path / "sae-checkpoint" / "key").mkdir(parents=True)
    stage.forget(tmp_path)
    assert not (tmp_path / "sae").exists() and not (tmp_path / "sae-checkpoint").exists()


def test_the_registry_orders_every_stage_and_method_stages_have_their_own_folders(tmp_path):
    assert STAGE_NAMES == (
        "probe", "sae", "features", "search", "distill", "evaluate", "method", "method-evaluate"
    )  # fmt: skip
    assert len({s.name for s in STAGES}) == len(STAGES) and all(s.about for s in STAGES)
    rmu = method_stage(STAGES[-2], "rmu")
    assert rmu.folder(tmp_path) == tmp_path / "method-rmu"
    assert method_stage(STAGES[-1], "rmu").folder(tmp_path) == tmp_path / "method-rmu-evaluate"
    assert rmu.key("x") == STAGES[-2].key("x")  # the folder differs, the content key does not
    assert invalidate(tmp_path, "evaluate") == ["evaluate", "method", "method-evaluate"]
