"""benchmarks/bench_suite.py choose: the folds' choice between candidates, cross-validated, by hand."""
import json

import pytest

from benchmark_scripts import load

suite = load("bench_suite")


def test_choose_scores_each_fold_at_the_other_folds_choice(tmp_path, capsys):
    # task "t", three folds; candidate a peaks at step 10, candidate b higher and later, at step 20
    a = {"t/0": [[0, 0.5], [10, 0.7], [20, 0.6]], "t/1": [[0, 0.5], [10, 0.6], [20, 0.5]],
         "t/2": [[0, 0.5], [10, 0.6], [20, 0.5]]}
    b = {"t/0": [[0, 0.5], [10, 0.6], [20, 0.99]], "t/1": [[0, 0.5], [10, 0.5], [20, 0.62]],
         "t/2": [[0, 0.5], [10, 0.5], [20, 0.6]]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert suite.main(["choose", f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}"]) == 0
    out = capsys.readouterr().out
    # held out 0: a's mean of folds 1, 2 at 10 is 0.6; b's at 20 is 0.61 -> b@20 scores fold 0 0.99
    # held out 1: a 0.65 at 10; b 0.795 at 20 -> b@20: 0.62; held out 2: a 0.65; b 0.805 -> b@20: 0.6
    # a alone: 0.7 at 10 for fold 0, 0.6, 0.6 -> 0.6333; b alone: 0.99, 0.62, 0.6 -> 0.7367
    assert out.strip() == ("t: untrained 0.5000  a 0.6333  b 0.7367  the folds choose 0.7367 (b@20, b@20, b@20)")
    # a share of a half cuts every curve to step 10: b never reaches its peak, a wins every fold
    assert suite.main(["choose", f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}", "--share", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == ("t: untrained 0.5000  a 0.6333  b 0.5333  the folds choose 0.6333 "
                                               "(a@10, a@10, a@10)")
    # --margin-se 2: b must lead a by two standard errors of the two other folds' differences; it
    # leads by 0.01 (0.02, 0.0), 0.145 (0.29, 0.0) and 0.155 (0.29, 0.02: s.e. 0.135), never by that
    assert suite.main(["choose", f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}", "--margin-se", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith("the folds choose 0.6333 (a@10, a@10, a@10)")


def test_few_class_test_tasks_keep_the_data_sets_zero_shot_split(tmp_path):
    """``run --classes K``: task t trains on the t-th K of the data set's training classes and tests on the
    t-th K of its test classes, so no task tests on a class any data set's training half holds."""
    for c in range(24):
        (tmp_path / f"sym{c:02d}").mkdir()
    assert suite.test_tasks("math", tmp_path, 0, 3) == [("math", [])]
    train, test = (set(json.loads(o.split("=", 1)[1])) for o in suite.split_overrides("math", tmp_path))
    tasks = suite.test_tasks("math", tmp_path, 3, 4)
    assert [t for t, _ in tasks] == ["math@3.0", "math@3.1", "math@3.2", "math@3.3"]
    splits = [[json.loads(o.split("=", 1)[1]) for o in data] for _, data in tasks]
    assert all(len(a) == len(b) == 3 and set(a) <= train and set(b) <= test for a, b in splits)
    assert len({c for a, _ in splits for c in a}) == 12 and len({c for _, b in splits for c in b}) == 12
    assert splits[0][0] == sorted(suite.hash_order(sorted(train))[:3])
    with pytest.raises(SystemExit, match="12 training and 12 test classes, too few for 5 tasks of 3"):
        suite.test_tasks("math", tmp_path, 3, 5)


def test_rotated_tasks_cover_every_class_and_keep_each_split_zero_shot(tmp_path):
    """``run --rotations N``: task r tests on a window of the classes in hash order, as many as the
    data set's own split tests, and trains on the rest; the windows move round all the classes."""
    for name in suite.FASHION_NAMES:
        (tmp_path / name).mkdir()
    tasks = suite.rotated_tasks("fashion", tmp_path, 5)
    assert [t for t, _ in tasks] == [f"fashion~{r}" for r in range(5)]
    splits = [[json.loads(o.split("=", 1)[1]) for o in data] for _, data in tasks]
    everything = set(suite.FASHION_NAMES)
    assert all(len(test) == 5 and set(train) == everything - set(test) for train, test in splits)
    assert len({tuple(test) for _, test in splits}) == 5 and set().union(*(t for _, t in splits)) == everything
    order = suite.hash_order(sorted(everything))
    assert splits[1][1] == sorted(order[2:7]) and splits[4][1] == sorted(order[8:] + order[:3])  # wrapping round


def test_curves_write_the_pooled_features_curves_for_choose(tmp_path, capsys):
    """``curves --pooled-json``: every validation of a fold run also scores the pooled features under
    the projection (what ``train.fold_retrieval`` compares); both files hold the same folds and
    steps, step 0 first, and ``choose embedding=... pooled=...`` compares them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in range(10):  # the digits' folder layout: class folders 0-9, of tiny grey images
        (tmp_path / "digits" / str(d)).mkdir(parents=True)
        base = rng.integers(0, 256, (4, 4))
        for i in range(6):
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).resize((8, 8)).save(tmp_path / "digits" / str(d) / f"{i}.png")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    args = ["curves", "--root", str(tmp_path), "--datasets", "digits", "--steps", "digits=4", "--every", "digits=2",
            "--folds", "2", "--json", str(a), "--pooled-json", str(b), "--set", "model.backbone_options={width: 8, grid: 2}",
            "model.embedding_dim=4"]
    assert suite.main(args) == 0
    embedding, pooled = json.loads(a.read_text()), json.loads(b.read_text())
    assert sorted(embedding) == sorted(pooled) == ["digits/0", "digits/1"]
    for key in embedding:
        assert [s for s, _ in embedding[key]] == [s for s, _ in pooled[key]] == [0, 2, 4]
        assert embedding[key] != pooled[key]
    capsys.readouterr()
    assert suite.main(["choose", f"embedding={a}", f"pooled={b}", "--margin-se", "1"]) == 0
    assert capsys.readouterr().out.startswith("digits: untrained ")


def _record(dataset, seed, system, test, untrained, members=1):
    keys = suite.METRICS
    return {"dataset": dataset, "seed": seed, "system": system, "kind": "report", "members": members,
            "test": dict(zip(keys, test)), "val": {"map@r": 0.5}, "untrained": {"test": dict(zip(keys, untrained))}}


def test_table_judges_the_default_against_one_untrained_network_and_lists_each_run_not_above(tmp_path, capsys):
    """``table``: the untrained network is one network (the PML loop's step 0) on every metric of the
    report, judged on the mean over seeds; every run not above it is listed with its metric."""
    one = [0.40, 0.60, 0.50, 0.90, 0.95, 0.99, 1.0, 0.93]     # one untrained network: R@8 at the ceiling
    four = [0.62, 0.76, 0.68, 0.98, 0.99, 0.995, 1.0, 0.99]   # the auto run's own step 0: four networks
    runs = [_record("digits", 0, "auto", [0.66, 0.75, 0.70, 0.99, 0.995, 0.997, 1.0, 0.995], four, members=4),
            _record("digits", 1, "auto", [0.64, 0.74, 0.69, 0.985, 0.995, 0.997, 1.0, 0.992], four, members=4),
            _record("digits", 0, "pml", [0.45] * 8, one), _record("digits", 1, "pml", [0.44] * 8, one)]
    (tmp_path / "a.json").write_text(json.dumps({"budget": "2m", "runs": runs}))
    assert suite.main(["table", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("digits"))
    # untrained R@1 / MAP@R are the one network's (0.90 / 0.40), not the four's; +0.205 over the loop;
    # recall@8 is 1.0 for both: equal, so not above on the mean -> short
    assert row.split()[2:4] == ["0.9000", "0.4000"] and "+0.2050" in row and row.endswith("<- short")
    assert "its own step 0 (4 networks): R@1 0.9800, MAP@R 0.6200; the mean above it on every metric but map, " \
           "recall@8" in out
    assert "target (>= +0.02 MAP@R" in out and out.split("every rotation): ")[1].startswith("NOT met")
    assert "above the untrained network on every metric on 0 of 2, below it on some metric on 0" in out
    assert "digits seed 0: recall@8 equal (1.0000 vs 1.0000)" in out
    # one run below on a metric is listed as below, and met needs every metric above on the mean
    runs[0]["test"]["recall@8"] = runs[1]["test"]["recall@8"] = 1.0
    for r in runs[2:]:
        r["untrained"]["test"]["recall@8"] = 0.999
    runs[1]["test"]["recall@4"] = 0.985  # below the one network's 0.99 on this run, above it on the mean
    (tmp_path / "a.json").write_text(json.dumps({"budget": "2m", "runs": runs}))
    assert suite.main(["table", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert out.split("every rotation): ")[1].startswith("met")
    assert "on every metric on 1 of 2, below it on some metric on 1" in out
    assert "digits seed 1: recall@4 below (0.9850 vs 0.9900)" in out
