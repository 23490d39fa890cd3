"""``deepmetric tune``: the search space table, a study that resumes, pruning, interrupted trials run
again, validation-only trials, the test scored once at the end, best.yaml, and bad input (issue 22)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import require_module

optuna = require_module("optuna", "the tune extra")

from deepmetric.cli import main  # noqa: E402
from deepmetric.config import Config, load_config, validate  # noqa: E402
from deepmetric.engine.callbacks import Callback  # noqa: E402
from deepmetric.engine.trainer import Trainer  # noqa: E402
from deepmetric.engine.tune import Search, tune_base  # noqa: E402
from deepmetric.engine.tune_space import (SPACE, Dimension, base_choices, space_for, trial_recipe,  # noqa: E402
                                          with_loss_defaults)

from test_auto import TINY, folder  # noqa: E402

#: trials of 4 steps with an evaluation every 2: no test depends on the wall clock
SHORT = [*TINY, "train.max_steps=4", "train.eval_every=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 classes of 5 images: the automatic recipe tests 2 and, with 6 left, has no validation split."""
    return folder(tmp_path_factory.mktemp("tune") / "imgs", n_classes=8, per_class=5)


def load(run):
    return optuna.load_study(study_name="tune", storage=f"sqlite:///{run / 'study.db'}")


def test_the_space_table_drives_the_suggestions():
    def term(family, current):
        return current if current["name"] == family else {"name": family, "params": {}}

    space = (Dimension("loss", "losses.0", choices=("triplet", "circle"), to_recipe=term, from_recipe=lambda t: t["name"]),
             Dimension("circle_gamma", "losses.0.params.gamma", 16.0, 256.0, log=True,
                       when=("losses.0.name", ("circle",))),
             Dimension("lr", "optimizer.lr", 0.1, 10.0, log=True, relative=True))
    base = Config(losses=[{"name": "multi_similarity", "params": {"miner_epsilon": 0.1}}],
                  optimizer={"lr": 0.002}).to_dict()
    made = space_for(base, space)
    assert made[0].choices == ("triplet", "circle", "multi_similarity")  # the base is a point of the space
    assert made[2].low == pytest.approx(2e-4) and made[2].high == pytest.approx(2e-2) and not made[2].relative
    assert base_choices(made, base) == {"loss": "multi_similarity", "lr": 0.002}  # circle_gamma does not apply
    raw = trial_recipe(made, base, lambda d: d.suggest(optuna.trial.FixedTrial({"loss": "circle", "circle_gamma": 64.0,
                                                                                 "lr": 0.005})))
    cfg = validate(raw)
    assert cfg.losses[0].name == "circle" and cfg.losses[0].params == {"gamma": 64.0} and cfg.optimizer.lr == 0.005
    # with the full table, the base's own choices give the base back: trial 0 is the default recipe
    auto = Config(losses=[{"name": "multi_similarity", "params": {"miner_epsilon": 0.1}}],
                  model={"backbone": "small_cnn", "backbone_options": {"width": 24}, "embedding_dim": 128}).to_dict()
    full = space_for(auto, SPACE)
    chosen = base_choices(full, auto)
    assert chosen["width"] == 24 and 24 in next(d for d in full if d.name == "width").choices
    assert chosen["memory"] == 0 and chosen["loss"] == "multi_similarity" and chosen["ms_beta"] == 50.0
    again = trial_recipe(full, auto, lambda d: d.suggest(optuna.trial.FixedTrial(chosen)))
    assert validate(again) == validate(with_loss_defaults(auto))


def test_a_search_resumes_validates_only_and_tests_the_best_once(images, tmp_path, monkeypatch, caplog):
    import deepmetric.engine.runs as runs

    scored = []
    evaluate = runs.evaluate
    monkeypatch.setattr(runs, "evaluate", lambda *a, **k: scored.append(k["checkpoint"]) or evaluate(*a, **k))
    run = tmp_path / "run"
    args = ["tune", str(images), "--run-dir", str(run), *SHORT]
    caplog.set_level("INFO", logger="deepmetric")
    assert main([*args, "--trials", "2"]) == 0
    assert "tune validates on 2 of them (30%, data.val_classes=0.3)" in caplog.text  # the few-classes rule
    first = load(run).trials
    assert [t.state.name for t in first] == ["COMPLETE", "COMPLETE"] and first[0].user_attrs["default"]
    best = load(run).best_trial.number
    assert sorted(scored) == sorted({str(run / "trials" / f"{n:04d}" / "checkpoints" / "best") for n in (0, best)})

    scored.clear()
    Search(tune_base(str(images), SHORT), run, trials=3).run()  # the same search, asked for one more trial
    study = load(run)
    assert len(study.trials) == 3 and sorted(p.name for p in (run / "trials").iterdir()) == ["0000", "0001", "0002"]
    for old, now in zip(first, study.trials):  # loaded, not run again
        assert (old.params, old.value, old.datetime_start) == (now.params, now.value, now.datetime_start)
    assert all(c.endswith(f"{study.best_trial.number:04d}/checkpoints/best") for c in scored) and len(scored) <= 1

    # validation only: a trial's run never held a test class, and logged validations alone
    names = sorted(p.name for p in images.iterdir())  # an image folder's class ids: its sorted folder names
    test_ids = {names.index(c) for c in load_config(run / "base.yaml").data.test_classes}
    assert len(test_ids) == 2
    for n in range(3):
        trial = run / "trials" / f"{n:04d}"
        splits = json.loads((trial / "splits.json").read_text())
        held = set(splits["train"]["class_ids"]) | set(splits["val"]["query"]["class_ids"])
        assert splits["test"] == splits["val"] and len(held) == 6 and not held & test_ids
        rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        assert {r["split"] for r in rows if "split" in r} == {"val"}

    # best.yaml is an ordinary recipe that repeats the best trial
    cfg = load_config(run / "best.yaml")
    assert cfg.train.max_steps == 4 and cfg.eval.untrained and cfg.eval.metric == "map@r"
    summary = Trainer(cfg, tmp_path / "again").fit()
    assert summary["val"]["map@r"] == pytest.approx(study.best_value)
    assert (run / "report.html").read_text().count("data:image/png;base64") == 3


def test_pruning_is_reported_to_optuna_and_stops_the_run(images, tmp_path):
    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    base = tune_base(str(images), [*TINY, "train.max_steps=6", "train.eval_every=2"])
    Search(base, tmp_path / "run", trials=2, pruner=Always()).run()
    default, pruned = load(tmp_path / "run").trials
    assert default.state.name == "COMPLETE" and sorted(default.intermediate_values) == [1, 2, 3]  # never pruned
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [1]
    assert pruned.user_attrs["steps"] == 2 < pruned.user_attrs["max_steps"] == 6  # stopped after that evaluation


def test_the_search_stops_a_trial_at_the_end_of_its_time(images, tmp_path):
    # a trial's budget is measured when it starts; a machine that slows down under it must not
    # stretch the search past --time: the trial stops there (the default is kept, not pruned)
    Search(tune_base(str(images), SHORT), tmp_path / "run", time=0.01).run()
    (default,) = load(tmp_path / "run").trials
    assert default.state.name == "COMPLETE" and default.user_attrs["stopped_by_time"] == 1
    assert default.user_attrs["steps"] == 1 and default.user_attrs["max_steps"] == 4


def test_an_interrupted_trial_is_failed_and_runs_again(images, tmp_path):
    class CtrlC(Callback):
        def on_evaluation(self, trainer, split, metrics):
            if trainer.cfg.name.endswith("trial0001"):
                raise KeyboardInterrupt

    base = tune_base(str(images), SHORT)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Search(base, run, trials=2, callbacks=[CtrlC()]).run()
    search = Search(base, run, trials=3)
    search.trial_config(load(run).ask())  # the re-run starts, and its session is killed: left running
    search.run()
    t = load(run).trials
    assert [x.state.name for x in t] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert t[1].user_attrs["interrupted"] and t[2].user_attrs["rerun_of"] == 1 and t[3].user_attrs["rerun_of"] == 2
    assert t[1].params == t[2].params == t[3].params and "rerun_of" not in t[4].user_attrs


@pytest.mark.parametrize("extra, says", [
    (["--time", "30x"], "--time 30x: expected a duration"),
    ([], "give --time (e.g. --time 30m) or --trials N"),
    (["--time", "1m", "--trial-budget", "2m"], "shorter than one trial of 2m"),
    (["--trials", "2", "data.val_classes=null"], "data.val_classes=null: tune selects on validation classes"),
    (["--trials", "2", "eval.protocol=reid"], "eval.protocol: tune scores validation MAP@R"),
])
def test_bad_input_is_one_line(images, tmp_path, capsys, extra, says):
    assert main(["tune", str(images), "--run-dir", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_without_optuna_the_extra_is_named(run_python):
    r = run_python("""
        import sys
        class NoOptuna:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "optuna":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoOptuna())
        from deepmetric.cli import main
        sys.exit(main(["tune", "somewhere", "--time", "30m"]))
    """)
    assert r.returncode == 2 and r.stderr == ("deepmetric: error: tune needs optuna, which is not installed: "
                                              "pip install 'deepmetric[tune]'\n"), r.stderr
