"""The data stage on bad inputs (smoke preset, in a scratch directory): a missing or empty nuScenes root
fails with an error naming `data.nuscenes_root` before anything is written, so every previous output
(recordings, the nuScenes copy, the built dataset, the metrics) stays byte-identical; a camera dropout
in a nuScenes folder is skipped and counted, or rejected whole in strict mode."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("nuscenes")

from stages.common import StageInputError  # noqa: E402
from stages.config import build_config  # noqa: E402
from stages.data.stage import run  # noqa: E402
from tests.unit.test_nuscenes import drop_camera_keyframe  # noqa: E402

OUTPUTS = ("data", "metrics")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("data-stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        run(build_config(preset="smoke"))
    return work


@pytest.fixture(autouse=True)
def _in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under the stage's output folders (names included: nothing added or removed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in OUTPUTS for p in sorted((root / top).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["missing", "empty", "no tables"])
def test_a_bad_nuscenes_root_fails_before_anything_is_written(workdir, tmp_path, kind):
    root = tmp_path / "nuscenes"
    if kind != "missing":
        root.mkdir()
    if kind == "no tables":
        (root / "v1.0-trainval").mkdir()
    before = snapshot(workdir)
    assert "data/sim/manifest.json" in before and "metrics/data.json" in before and "data/train/manifest.json" in before
    with pytest.raises(StageInputError) as err:
        run(build_config(preset="smoke", overrides=[f"data.nuscenes_root={root}"]))
    message = str(err.value)
    assert f"data.nuscenes_root='{root}'" in message and "set it to null" in message
    assert snapshot(workdir) == before


def test_a_rerun_with_nothing_to_record_keeps_the_recordings_byte_identical(workdir):
    before = {k: v for k, v in snapshot(workdir).items() if k.startswith("data/sim/")}
    run(build_config(preset="smoke"))
    assert {k: v for k, v in snapshot(workdir).items() if k.startswith("data/sim/")} == before


def test_a_camera_dropout_is_skipped_and_counted_or_rejected_in_strict_mode(workdir, tmp_path):
    root = tmp_path / "nuscenes"
    shutil.copytree(workdir / "data/nuscenes-sim", root)
    token = drop_camera_keyframe(root, sample_index=0, version="v1.0-trainval")
    before = snapshot(workdir)
    with pytest.raises(StageInputError, match=rf"sample\[{token}\] has no keyframe CAM_FRONT"):
        run(build_config(preset="smoke", overrides=[f"data.nuscenes_root={root}", "data.nuscenes_strict=true"]))
    assert snapshot(workdir) == before
    result = run(build_config(preset="smoke", overrides=[f"data.nuscenes_root={root}"]))
    assert result["metrics"]["nuscenes_skipped_samples"] == 1
    assert json.loads((workdir / "metrics/data.json").read_text())["nuscenes_skipped_samples"] == 1
