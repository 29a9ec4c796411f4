"""Reports: header + metrics at the top level, atomic writes, strict reading."""

import json

import pytest

from spartan_cli import __version__
from spartan_cli.measure.report import SCHEMA_VERSION, Report, ReportError, make_report, read_report, write_report


def _report(**metrics):
    return make_report("density", command="spartan density ckpt --json", config={"model": "ckpt", "batch_size": 8},
                       metrics=metrics or {"overall": {"density": 0.25}})


def test_header_then_metrics_at_top_level():
    d = _report().to_dict()
    assert list(d)[:6] == ["schema_version", "spartan_version", "kind", "command", "config", "versions"]
    assert d["schema_version"] == SCHEMA_VERSION and d["spartan_version"] == __version__
    assert d["overall"]["density"] == 0.25  # what `jq .overall.density` reads
    assert set(d["versions"]) >= {"torch", "transformers", "python"}


def test_round_trip_through_file(tmp_path):
    report = _report()
    path = write_report(report, tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / "density.json"
    assert read_report(path) == report
    assert [p.name for p in path.parent.iterdir()] == ["density.json"]  # no temp file left behind


def test_rewrite_replaces_whole_file(tmp_path):
    write_report(_report(overall={"density": 0.5, "long": "x" * 1000}), tmp_path)
    path = write_report(_report(overall={"density": 0.1}), tmp_path)
    assert json.loads(path.read_text())["overall"] == {"density": 0.1}


def test_non_finite_numbers_become_null():
    text = _report(overall={"density": float("nan"), "ce": float("inf"), "rows": [1.0, float("-inf")]}).to_json()
    assert json.loads(text)["overall"] == {"density": None, "ce": None, "rows": [1.0, None]}
    assert "NaN" not in text and "Infinity" not in text


def test_wrong_schema_and_bad_files_are_refused(tmp_path):
    d = _report().to_dict()
    (tmp_path / "old.json").write_text(json.dumps({**d, "schema_version": 0}))
    with pytest.raises(ReportError, match="schema_version 0"):
        read_report(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        read_report(tmp_path / "bad.json")
    with pytest.raises(ReportError, match="does not exist"):
        read_report(tmp_path / "missing.json")
    with pytest.raises(ReportError, match="kind"):
        Report.from_dict({**d, "kind": "train"})
    (tmp_path / "file").write_text("")
    with pytest.raises(ReportError, match="not a directory"):
        write_report(_report(), tmp_path / "file")


def test_metric_keys_may_not_shadow_the_header():
    with pytest.raises(AssertionError, match="collide"):
        Report(kind="evaluate", command="", config={}, metrics={"config": 1})


def test_evaluate_result_round_trips():
    from spartan_cli.measure.evaluate import EvalResult, Scores
    from spartan_cli.tasks import TaskMetric, TaskResult

    task = TaskResult("addition", (TaskMetric("accuracy", 0.5, 10, "exact match", "fraction"),))
    result = EvalResult(model=Scores("ckpt", True, 0.1, 50, 5, 0.02, task), base=Scores("base", False, 0.08, 50, 5, None, task),
                        data={"source": "x.txt", "split": "all"})
    report = make_report("evaluate", command="spartan evaluate ckpt", config={}, metrics=result.to_dict())
    back = Report.from_dict(json.loads(report.to_json()))
    assert EvalResult.from_dict(back.metrics) == result
    assert back.metrics["ce_gap"] == pytest.approx(0.02)
    assert back.metrics["model"]["task"]["metrics"]["accuracy"]["value"] == 0.5


@pytest.mark.parametrize("kind", ["plain", "gap", "kl"])
def test_trajectory_draws_the_constraint_panel_when_the_run_had_one(tmp_path, kind):
    """trajectory.png from train_log.jsonl records: three panels, or four with the constraint the
    multiplier read (CE gap to the dense model on the same rows, or KL) against its slack."""
    import matplotlib.image

    from spartan_cli.measure.plots import trajectory

    records = []
    for step in range(1, 41):
        r = {"step": step, "ce": 3.0 + 0.01 * step, "tau": 3.1, "beta": 1e-3 * step, "density": 0.9 - 0.02 * step,
             "heldout_ce": 3.05 if step % 10 == 0 else None, "heldout_density": 0.5 if step % 10 == 0 else None}
        if kind == "gap":
            r.update(det_ce=3.1, ref_ce=3.08, slack=0.01)
        elif kind == "kl":
            r.update(kl=0.02, slack=0.05, ref_ce=3.0)
        records.append(r)
    path = trajectory(records, tmp_path / "t.png", title="test")
    height = matplotlib.image.imread(path).shape[0]
    assert (height > 900) == (kind != "plain")  # 9.5 in tall with the fourth panel, else 7.5 (110 dpi)
