"""Progress off a terminal: log lines instead of a bar; phases after the bar are said."""
import io
import logging
import re
import sys

from deepmetric.config import load_config
from deepmetric.engine.callbacks import format_duration
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE

VAL = ["data.train_classes=[0,1,2,3,4,5,6]", "data.val_classes=[5,6]"]  # 5 train, 2 validate


def _fit(tmp_path, tiny, caplog, *extra):
    cfg = load_config(RECIPE, [*tiny, "train.progress=true", *extra])
    with caplog.at_level(logging.INFO, logger="deepmetric"):
        Trainer(cfg, tmp_path / "run").fit()
    return [r.getMessage() for r in caplog.records if r.name == "deepmetric"]


def test_log_lines_when_stderr_is_no_terminal(tmp_path, tiny_overrides, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY
    lines = _fit(tmp_path, tiny_overrides, caplog, "train.max_steps=4", "train.log_every=2", "train.eval_every=2",
                 *VAL, "eval.untrained=false")
    steps = [x for x in lines if x.startswith("step ") and "/" in x.split()[1]]
    assert len(steps) == 2
    assert re.fullmatch(r"step 2/4  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  \d+ img/s  ETA \d+s", steps[0]), steps[0]
    assert steps[1].startswith("step 4/4") and steps[1].endswith("ETA 0s")
    val = [x for x in lines if "validation recall@1" in x]
    assert re.fullmatch(r"step 2: validation recall@1 \d\.\d{4} \(best \d\.\d{4} at step 2\)", val[0]), val
    assert "evaluating the selected checkpoint (step " in "\n".join(lines)
    assert "on the test split" in "\n".join(lines)


def test_no_log_lines_with_progress_off(tmp_path, tiny_overrides, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines = _fit(tmp_path, tiny_overrides, caplog, "train.max_steps=2", "train.progress=false", "eval.untrained=false")
    assert not [x for x in lines if x.startswith("step 1/2") or "ETA" in x]


def test_on_a_terminal_the_bar_closes_before_the_final_test(tmp_path, tiny_overrides, caplog, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    lines = _fit(tmp_path, tiny_overrides, caplog, "train.max_steps=2", *VAL, "eval.untrained=false")
    assert not [x for x in lines if "ETA" in x], "the bar shows progress on a terminal"
    assert "evaluating the selected checkpoint" in "\n".join(lines)
    assert "2/2" in sys.stderr.getvalue(), "the tqdm bar was drawn"


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 130, 3725)] == ["0s", "1m00s", "2m10s", "1h02m"]
