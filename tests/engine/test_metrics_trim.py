"""metrics.json holds each iteration once after any resume (--resume, a requeue, a retry)."""
import json

from maps.engine.run_record import read_metrics, trim_metrics


def _lines(path):
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def test_a_resume_cuts_what_the_killed_attempt_logged_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.json"
    writer = open(path, "a")  # detectron2's JSONWriter keeps it open in append mode
    for it in range(10):
        writer.write(json.dumps({"iteration": it, "loss": it}) + "\n")
    writer.write('{"iteration": 10, "lo')  # killed mid-line
    writer.flush()
    assert trim_metrics(tmp_path, 6) == 5      # 6, 7, 8, 9 and the torn line
    for it in range(6, 8):                     # the resumed attempt logs again from 6
        writer.write(json.dumps({"iteration": it, "loss": -it}) + "\n")
    writer.close()
    assert _lines(path) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in read_metrics(tmp_path)][-2:] == [-6, -7]
    assert trim_metrics(tmp_path, 100) == 0 and trim_metrics(tmp_path / "none", 3) == 0
