"""``train.length_folds``: the run's length chosen on folds of its few training classes (issue 22,
few classes): the folds' curves and choice, the run that follows, its exact repeat from
``config.yaml``, the budget share, and the recipe that asks for it."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from deepmetric.config import ConfigError, load_config
from deepmetric.engine.auto import auto_config, fold_classes
from deepmetric.engine.folds import FOLD_VAL_PER_CLASS, choose_length, mean_curve
from deepmetric.engine.schedule import LRSchedule
from deepmetric.engine.trainer import Trainer
from deepmetric.viz.summary import format_summary

from tests.engine.test_auto import TINY, folder


def test_the_mean_curve_and_the_chosen_step():
    curves = [[(0, 0.9), (5, 0.5), (10, 0.7)], [(0, 0.7), (5, 0.8), (10, 0.6), (15, 0.9)]]
    assert mean_curve(curves) == [(0, 0.8), (5, 0.65), (10, 0.65)]  # steps both folds evaluated
    assert choose_length(mean_curve(curves)) == 5  # the best trained step, the earliest of equals
    with pytest.raises(ValueError, match="no trained step"):
        choose_length([(0, 0.5)])


def test_the_schedule_can_be_longer_than_the_run():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = load_config("quickstart", ["scheduler.name=cosine", "scheduler.warmup_steps=0"]).scheduler
    long = LRSchedule(cfg, [opt], 100)
    short = LRSchedule(cfg.model_copy(update={"total_steps": 100}), [opt], 30)
    assert [short.factor(s) for s in range(30)] == [long.factor(s) for s in range(30)]
    assert short.factor(29) > 0.5  # not decayed to zero at the run's end


def test_folds_choose_the_length_and_the_config_repeats_it(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=8, per_class=6, size=8, grey=True)
    cfg = auto_config(root, [*TINY, "train.max_steps=40", "train.log_every=5", "train.fold_candidates=[]",
                             "train.fold_members=1"]).config  # one network: each fold and the run get a quarter
    assert len(cfg.train.length_folds) == 3 and cfg.data.val_classes is None and cfg.train.fold_share is None
    trainer = Trainer(cfg, tmp_path / "a")
    summary = trainer.fit()
    record = json.loads((tmp_path / "a" / "folds.json").read_text())
    assert len(record["curves"]) == 3
    # max_steps 40 covers the folds: 3 folds of 40 // 4 = 10 steps, evaluated every step, step 0 first
    assert all([s for s, _ in c] == list(range(11)) for c in record["curves"])
    for i, fold in enumerate(cfg.train.length_folds):  # each fold is an ordinary run of its own
        fold_run = load_config(tmp_path / "a" / "folds" / str(i + 1) / "config.yaml")
        assert fold_run.data.val_classes == fold and fold_run.train.max_steps == 10
        assert fold_run.data.val_per_class == FOLD_VAL_PER_CLASS
        scored = json.loads((tmp_path / "a" / "folds" / str(i + 1) / "metrics.json").read_text())
        # a fold run's test rows score its held-out classes, never the data set's test classes
        assert scored["untrained"]["test"] == scored["untrained"]["val"]
        assert scored["num_queries"] == scored["untrained"]["val"]["num_queries"] == 2 * 6
    assert record["steps"] == choose_length([tuple(x) for x in record["mean"]])
    assert 1 <= summary["max_steps"] == record["steps"] == summary["step"] <= 10
    assert summary["length_folds"]["folds"] == 3 and summary["length_folds"]["schedule_steps"] == 10
    assert any(n.startswith("length chosen on 3 folds of the training classes") for n in summary["notes"])
    assert "a length chosen on 3 folds of the training classes" in format_summary(summary)
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert written["train"]["length_folds"] == [] and written["train"]["max_steps"] == record["steps"]
    assert written["scheduler"]["total_steps"] == 10
    again = Trainer(load_config(tmp_path / "a" / "config.yaml"), tmp_path / "b").fit()  # no folds: the same run
    assert not (tmp_path / "b" / "folds").exists() and again["metrics"] == summary["metrics"]
    a = (tmp_path / "a" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "checkpoints" / "last" / "model.safetensors").read_bytes()


def test_a_time_budget_is_shared_with_the_folds(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=7, per_class=6, size=8, grey=True)
    cfg = auto_config(root, [*TINY, "train.time_budget=12s"]).config
    assert len(cfg.train.length_folds) == 3  # 5 training classes: three folds of two
    assert len(cfg.train.fold_candidates) == 2  # the recipe, and the recipe with an instance term
    summary = Trainer(cfg, tmp_path / "a").fit()
    plans = [load_config(tmp_path / "a" / "folds" / str(i + 1) / "config.yaml").train for i in range(6)]
    for first in (0, 3):  # each candidate plans its first fold's steps for its share; its other folds repeat them
        assert plans[first].time_budget is None and all(p.max_steps == plans[first].max_steps
                                                        for p in plans[first:first + 3])
        # the folds take 0.6 of it (train.fold_share, set with train.fold_members): a tenth each
        assert any(n.startswith(f"train.time_budget={12 * 0.6 / 6:g}s came to") for n in json.loads(
            (tmp_path / "a" / "folds" / str(first + 1) / "metrics.json").read_text())["notes"])
    chosen = 3 * summary["length_folds"]["candidate"]
    assert summary["max_steps"] <= plans[chosen].max_steps == summary["length_folds"]["schedule_steps"]


def test_the_folds_choose_a_candidate_and_the_config_repeats_it(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=8, per_class=6, size=8, grey=True)
    instance = "{name: ntxent, labels: instance, params: {temperature: 0.2}}"
    candidates = f'[{{"optimizer.lr": 0.01}}, {{"optimizer.lr": 0.002, losses: [{{name: multi_similarity}}, {instance}]}}]'
    cfg = auto_config(root, [*TINY, "train.max_steps=35", f"train.fold_candidates={candidates}", "train.fold_members=1",
                             "train.fold_retrieval=false"]).config  # one network: the six fold runs and the run share 35
    summary = Trainer(cfg, tmp_path / "a").fit()
    record = json.loads((tmp_path / "a" / "folds.json").read_text())
    vals = [c["val"] for c in record["by_candidate"]]
    best = record["candidate"]
    assert record["margin_se"] == 0.0  # given candidates: the best mean wins
    assert len(vals) == 2 and best == max(range(2), key=lambda j: (vals[j], -j)) == summary["length_folds"]["candidate"]
    for c in record["by_candidate"]:  # each fold's value at the candidate's length, whose mean is its value
        assert c["folds"] == [dict(map(tuple, curve))[c["steps"]] for curve in c["curves"]]
        assert c["val"] == pytest.approx(sum(c["folds"]) / 3)
    assert all(len(c["curves"]) == 3 for c in record["by_candidate"]) and record["curves"] == record["by_candidate"][best]["curves"]
    lrs = [load_config(tmp_path / "a" / "folds" / str(i + 1) / "config.yaml").optimizer.lr for i in range(6)]
    assert lrs == [0.01] * 3 + [0.002] * 3  # 35 // 7 = 5 steps each
    assert all(load_config(tmp_path / "a" / "folds" / str(i + 1) / "config.yaml").train.max_steps == 5 for i in range(6))
    written = load_config(tmp_path / "a" / "config.yaml")  # the chosen candidate's recipe, its length, no folds
    assert written.optimizer.lr == [0.01, 0.002][best] and len(written.losses) == 1 + best
    assert written.train.fold_candidates == [] and written.train.length_folds == []
    assert written.train.max_steps == record["steps"] == summary["step"]
    assert f"the folds chose {best + 1}: optimizer.lr=" in " ".join(summary["notes"])
    assert f"candidate {best + 1} of the 2 train.fold_candidates" in format_summary(summary)
    again = Trainer(written, tmp_path / "b").fit()  # built afresh from config.yaml: the same run
    assert again["metrics"] == summary["metrics"]
    a = (tmp_path / "a" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "checkpoints" / "last" / "model.safetensors").read_bytes()


def test_a_later_candidate_must_win_by_the_margin(tmp_path):
    """``train.fold_margin_se``: a candidate ahead of the first by less than that many standard errors
    of the fold-by-fold differences leaves the first in place, and the note says by how much it was ahead."""
    root = folder(tmp_path / "imgs", n_classes=8, per_class=6, size=8, grey=True)
    candidates = '[{"model.embedding_dim": 2}, {}]'  # two dimensions tell 8 classes apart worse
    base = [*TINY, "train.max_steps=35", f"train.fold_candidates={candidates}", "train.fold_members=1"]
    free = Trainer(auto_config(root, base).config, tmp_path / "a").fit()
    assert free["length_folds"]["candidate"] == 1
    record = json.loads((tmp_path / "a" / "folds.json").read_text())
    se = record["by_candidate"][1]["se"]
    gap = record["by_candidate"][1]["val"] - record["by_candidate"][0]["val"]
    assert se > 0 and gap > 0
    passed = Trainer(auto_config(root, [*base, f"train.fold_margin_se={0.99 * gap / se}"]).config, tmp_path / "p").fit()
    assert passed["length_folds"]["candidate"] == 1  # a lead just above the margin
    assert f"(ahead of candidate 1 by {gap:.4f}, more than" in " ".join(passed["notes"])
    held = Trainer(auto_config(root, [*base, f"train.fold_margin_se={1.01 * gap / se}"]).config, tmp_path / "b").fit()
    assert held["length_folds"]["candidate"] == 0
    assert load_config(tmp_path / "b" / "config.yaml").model.embedding_dim == 2
    note = next(n for n in held["notes"] if n.startswith("length chosen on 3 folds"))
    assert f"candidate 2 was ahead by {gap:.4f}, within" in note and "train.fold_margin_se" in note
    # the automatic recipe's own candidates (the instance term) must win by one standard error
    assert auto_config(root, TINY).config.train.fold_margin_se == 1.0
    assert auto_config(root, [*TINY, "train.fold_margin_se=0"]).config.train.fold_margin_se == 0.0


def test_the_folds_choose_what_the_run_retrieves(tmp_path):
    """``train.fold_retrieval`` (the automatic recipe's, with few classes): every fold validation also
    scores the pooled features under the projection. Under a 2-d projection they lead by far: the run
    retrieves them at their own length, ``config.yaml`` repeats it, and ``deepmetric eval`` and the
    Predictor give what the run scored. Under a margin nothing passes, the embedding stays."""
    from deepmetric.cli import main as cli
    from deepmetric.inference.predictor import Predictor

    root = folder(tmp_path / "imgs", n_classes=8, per_class=6, size=8, grey=True)
    base = [*TINY, "model.embedding_dim=2", "train.max_steps=40", "train.fold_candidates=[]", "train.fold_members=1"]
    cfg = auto_config(root, base).config
    assert cfg.train.fold_retrieval and cfg.train.fold_margin_se == 1.0 and cfg.model.retrieval == "embedding"
    summary = Trainer(cfg, tmp_path / "a").fit()
    record = json.loads((tmp_path / "a" / "folds.json").read_text())
    choice, embedding = record["retrieval_choice"], record["by_candidate"][0]
    assert record["retrieval"] == "pooled" == summary["length_folds"]["retrieval"]
    assert choice["embedding"]["folds"] == embedding["folds"] and choice["embedding"]["steps"] == embedding["steps"]
    assert choice["pooled"]["folds"] == [dict(map(tuple, c))[record["steps"]] for c in record["curves"]]
    assert record["steps"] == choice["pooled"]["steps"] == choose_length([tuple(x) for x in record["mean"]])
    assert choice["pooled"]["val"] - choice["embedding"]["val"] > choice["se"] > 0
    assert record["curves"] != embedding["curves"] and all(c[0][0] == 0 for c in record["curves"])
    note = next(n for n in summary["notes"] if n.startswith("length chosen on 3 folds"))
    assert "so the run retrieves the pooled features (train.fold_retrieval, model.retrieval=pooled)" in note
    written = load_config(tmp_path / "a" / "config.yaml")
    assert written.model.retrieval == "pooled" and not written.train.fold_retrieval
    assert written.train.max_steps == record["steps"] == summary["step"]
    again = Trainer(written, tmp_path / "b").fit()  # config.yaml repeats it without the folds
    assert again["metrics"] == summary["metrics"]
    assert cli(["eval", str(tmp_path / "a"), "--output", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert scored.get("metrics", scored)["map@r"] == pytest.approx(summary["metrics"]["map@r"], abs=1e-6)
    assert Predictor.from_checkpoint(tmp_path / "a").embedding_dim == 64  # 16 channels x a 2 x 2 grid
    held = Trainer(auto_config(root, [*base, "train.fold_margin_se=1000"]).config, tmp_path / "c").fit()
    assert held["length_folds"]["retrieval"] == "embedding"
    assert load_config(tmp_path / "c" / "config.yaml").model.retrieval == "embedding"
    assert "within the margin of 1000 standard errors of the folds' differences" in " ".join(held["notes"])
    # an ensemble of your own (model.members) keeps its count when the folds change the retrieval
    two = auto_config(root, [*base, "train.max_steps=14", "model.members=2"]).config
    assert two.train.fold_retrieval and Trainer(two, tmp_path / "d").fit()["length_folds"]["retrieval"] == "pooled"
    written = load_config(tmp_path / "d" / "config.yaml")
    assert written.model.members == 2 and written.model.retrieval == "pooled"
    # your own retrieval, or a run without folds: nothing to choose
    assert not auto_config(root, [*base, "model.retrieval=pooled"]).config.train.fold_retrieval
    with pytest.raises(ConfigError, match="train.fold_retrieval compares the embedding with the pooled features"):
        auto_config(root, [*base, "model.embedding_dim=0", "train.fold_retrieval=true"])


def test_a_candidate_too_slow_for_its_share_is_left_out_not_fatal(tmp_path, monkeypatch):
    """A later candidate whose fold runs' share of the budget is too short for one evaluation (here its
    steps are made to measure 1,000 s) is not tried: the first candidate's folds, already run, choose
    the length, and the notes, the summary and ``folds.json`` say why. (Found on a busy machine, where
    the instance term's steps measured 20 times the recipe's and the run failed after its folds.)"""
    import deepmetric.engine.budget as budget

    real = budget._time_steps

    def timed(trainer, *args, **kwargs):
        if len(trainer.cfg.losses) > 1:  # the instance term's candidate
            return 1000.0, 1000.0, 0.0
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(budget, "_time_steps", timed)
    root = folder(tmp_path / "imgs", n_classes=7, per_class=6, size=8, grey=True)
    cfg = auto_config(root, [*TINY, "train.time_budget=20s"]).config
    assert len(cfg.train.fold_candidates) == 2 and cfg.train.fold_margin_se == 1.0
    summary = Trainer(cfg, tmp_path / "a").fit()
    assert summary["length_folds"]["candidate"] == 0 and summary["length_folds"]["candidates"][1] is None
    notes = " ".join(summary["notes"])
    assert ("train.fold_candidates: candidate 2 was not tried: its fold runs' share of the budget (2 s each) is "
            "too short for one evaluation of it (the untrained evaluation took") in notes
    assert "train.fold_candidates: " in notes and "not tried) the folds chose 1: the recipe as it is" in notes
    record = json.loads((tmp_path / "a" / "folds.json").read_text())
    assert record["candidate"] == 0 and record["by_candidate"][1] == {"tried": False}
    assert len(record["by_candidate"][0]["curves"]) == 3
    written = load_config(tmp_path / "a" / "config.yaml")
    assert len(written.losses) == 1 and written.train.fold_candidates == [] and written.train.max_steps == summary["step"]
    assert "candidate 1 of the 2 train.fold_candidates" in format_summary(summary)


def test_the_thread_count_the_first_fold_kept_is_the_folds_and_the_runs(tmp_path, monkeypatch):
    """``train.threads=0`` with folds: the first fold run measures (one thread is faster here: other
    work holds the cores), and the other folds and the run compute on the count it kept."""
    from tests.engine.test_auto import _busy

    _busy(monkeypatch, True)
    root = folder(tmp_path / "imgs", n_classes=7, per_class=6, size=8, grey=True)
    cfg = auto_config(root, [*TINY, "train.time_budget=10s", "train.fold_candidates=[]"]).config
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = Trainer(cfg, tmp_path / "a").fit()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [load_config(tmp_path / "a" / "folds" / str(i + 1) / "config.yaml").train.threads for i in range(3)] == [1] * 3
    assert load_config(tmp_path / "a" / "config.yaml").train.threads == 1
    assert "train.threads=1: a step took" in " ".join(json.loads(
        (tmp_path / "a" / "folds" / "1" / "metrics.json").read_text())["notes"])
    assert summary["step"] >= 1


def test_the_recipe_asks_for_folds_only_where_the_classes_are_few(tmp_path):
    assert fold_classes(["a", "b", "c", "d", "e"], 3) == [["d", "e"], ["c", "a"], ["b", "d"]]
    assert fold_classes(list("abcd"), 3) == [["d", "c"], ["a", "b"]]  # two folds cover four classes
    assert fold_classes(list("abc"), 3) == []  # a fold of two would leave one class to train on
    assert len(fold_classes([f"k{i}" for i in range(29)], 3)[0]) == 6  # a fifth of them
    root = folder(tmp_path / "imgs", n_classes=12, per_class=5, size=8)
    recipe = auto_config(root, TINY)
    train = set(recipe.profile.class_keys) - set(recipe.config.data.test_classes)
    assert all(set(f) <= train for f in recipe.config.train.length_folds)
    assert "train.length_folds = " in recipe.describe() and "the budget covers the folds" in recipe.describe()
    assert recipe.config.train.ema == 0.99  # the folds score a moving average of the weights, steadier
    assert auto_config(root, [*TINY, "data.val_classes=0.3"]).config.train.length_folds == []
    given = auto_config(root, [*TINY, 'data.train_classes=["c00", "c01", "c02", "c03", "c04"]']).config
    assert len(given.train.length_folds) == 3
    assert set(sum(given.train.length_folds, [])) == {"c00", "c01", "c02", "c03", "c04"}
    tested = auto_config(root, [*TINY, 'data.test_classes=["c00", "c01"]']).config.train.length_folds
    assert len(tested) == 3 and not {"c00", "c01"} & set(sum(tested, []))
    # test classes given by id (integers): their names are not known here, so no folds (they could
    # hold a test class); the run keeps its last step as before
    assert auto_config(root, [*TINY, "data.test_classes=[0, 1]"]).config.train.length_folds == []
    many = auto_config(folder(tmp_path / "many", n_classes=60, per_class=3, size=8), TINY)
    assert many.config.train.length_folds == [] and isinstance(many.config.data.val_classes, float)
    assert many.config.train.ema == 0.0


def test_bad_folds_get_one_line(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=8, per_class=5, size=8)
    with pytest.raises(ConfigError, match="train.length_folds chooses the length where there is no validation"):
        auto_config(root, [*TINY, "train.length_folds=[[c00]]", "data.val_classes=0.3"])
    with pytest.raises(ConfigError, match=r"train.fold_candidates.1: unknown config key 'optimizer.lrr'; did you mean 'lr'"):
        auto_config(root, [*TINY, 'train.fold_candidates=[{}, {"optimizer.lrr": 0.1}]'])
    with pytest.raises(ConfigError, match=r"train.fold_candidates are compared on the folds of train.length_folds, "
                                          r"which is empty"):
        load_config("quickstart", ['train.fold_candidates=[{"optimizer.lr": 0.1}]'])
    cfg = auto_config(root, [*TINY, "train.max_steps=8", 'train.length_folds=[["c00", "c01", "c02", "c03", "c04"]]']).config
    with pytest.raises(ConfigError, match=r"fold 1 \(.*\) leaves 1 training class; a fold must leave at least 2"):
        Trainer(cfg, tmp_path / "run").fit()
    assert not (tmp_path / "run").exists()
    short = auto_config(root, [*TINY, "train.time_budget=0.05s"]).config
    with pytest.raises(ConfigError, match=r"^train.time_budget=0.05s: too short for the folds that choose the length "
                                          r"\(train.length_folds\): each of the 6 gets 0.1 of it, too little for one "
                                          r"evaluation \(the untrained .*\); give at least \d+s, or train.length_folds=\[\]$"):
        Trainer(short, tmp_path / "short").fit()
    assert not (tmp_path / "short").exists()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(8))
    with pytest.raises(ConfigError, match=r"train.length_folds builds its folds from the recipe, and this run's "
                                          r"model is a Python object"):
        Trainer(cfg, tmp_path / "objects", model=net).fit()


@pytest.mark.parametrize("rising", [True, False])
def test_fold_share_and_the_extension_to_the_rest_of_the_budget(tmp_path, monkeypatch, rising):
    """``train.fold_share``: the fold runs' part of ``max_steps``; ``train.fold_extend``: a mean curve
    still at its best at its last step sends the run on for the rest, on a schedule of that length;
    one that turned down keeps the folds' length. The curves are set, so that both ways are taken."""
    import deepmetric.engine.folds as folds

    def curve(trainer, metric):  # the fold really trained; only its scores are replaced
        last = trainer.cfg.train.max_steps
        return [(0, 0.5), (last // 2, 0.6), (last, 0.7 if rising else 0.55)]

    monkeypatch.setattr(folds, "validation_curve", curve)
    root = folder(tmp_path / "imgs", n_classes=8, per_class=6, size=8, grey=True)
    cfg = auto_config(root, [*TINY, "train.max_steps=40", "train.fold_candidates=[]", "train.fold_share=0.6",
                             "train.fold_extend=true", "train.fold_retrieval=false"]).config  # set curves: the embedding's
    summary = Trainer(cfg, tmp_path / "a").fit()
    record = json.loads((tmp_path / "a" / "folds.json").read_text())
    assert all(load_config(tmp_path / "a" / "folds" / str(i + 1) / "config.yaml").train.max_steps == 8
               for i in range(3))  # 0.6 of 40 steps, shared by 3 fold runs
    written = load_config(tmp_path / "a" / "config.yaml")
    if rising:  # 40 - 3 x 8 steps, and the schedule ends with them
        assert record["extended"] == 16 == summary["step"] == written.train.max_steps == written.scheduler.total_steps
        assert "the run trains for the rest of the budget instead: 16 steps (train.fold_extend)" in " ".join(summary["notes"])
    else:  # the best step, on the folds' schedule
        assert record["extended"] == 0 and summary["step"] == 4 == written.train.max_steps
        assert written.scheduler.total_steps == 8
    again = Trainer(written, tmp_path / "b").fit()  # config.yaml repeats it without the folds
    assert again["metrics"] == summary["metrics"]


@pytest.mark.parametrize("allowed", [4, 1])
def test_an_early_length_leaves_the_share_to_more_members(tmp_path, monkeypatch, allowed):
    """``train.fold_members``: the folds' curves peak at step 2. With ``fold_members=4`` the automatic
    recipe gives the folds 0.6 of the 40 steps (``train.fold_share``: 8 steps each), so the run's 16
    hold 8 networks of that length: it trains 4 of them as one ensemble (``model.members``), each
    for 2 steps; ``config.yaml`` repeats it, and ``deepmetric eval`` scores the checkpoint as the run
    did. With ``fold_members=1`` it stays one network (and each fold run gets a quarter)."""
    import deepmetric.engine.folds as folds
    from deepmetric.cli import main as cli

    def curve(trainer, metric):  # the fold really trained; only its scores are replaced
        return [(0, 0.5), (2, 0.8), (trainer.cfg.train.max_steps, 0.6)]

    monkeypatch.setattr(folds, "validation_curve", curve)
    root = folder(tmp_path / "imgs", n_classes=8, per_class=6, size=8, grey=True)
    cfg = auto_config(root, [*TINY, "train.max_steps=40", "train.fold_candidates=[]",
                             f"train.fold_members={allowed}", "train.fold_retrieval=false"]).config
    summary = Trainer(cfg, tmp_path / "a").fit()
    record = json.loads((tmp_path / "a" / "folds.json").read_text())
    written = load_config(tmp_path / "a" / "config.yaml")
    members = 4 if allowed == 4 else 1
    assert written.scheduler.total_steps == (8 if allowed == 4 else 10) and cfg.train.fold_share == (
        0.6 if allowed == 4 else None)
    assert record["steps"] == 2 == summary["step"] == written.train.max_steps and record["members"] == members
    assert written.model.members == members and summary["length_folds"]["members"] == members
    assert summary["metrics"]["num_queries"] > 0
    notes = " ".join(summary["notes"])
    assert ("trains an ensemble of 4 (train.fold_members, model.members)" in notes) == (members == 4)
    weights = (tmp_path / "a" / "checkpoints" / "last" / "model.safetensors")
    from safetensors.torch import load_file

    keys = load_file(str(weights))
    assert any(k.startswith("members.3.") for k in keys) == (members == 4)
    again = Trainer(written, tmp_path / "b").fit()  # config.yaml repeats it without the folds
    assert again["metrics"] == summary["metrics"]
    assert cli(["eval", str(tmp_path / "a"), "--output", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert scored.get("metrics", scored)["map@r"] == pytest.approx(summary["metrics"]["map@r"], abs=1e-6)
