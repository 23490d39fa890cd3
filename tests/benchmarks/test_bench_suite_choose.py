"""benchmarks/bench_suite.py choose: the folds' choice between candidates, cross-validated, by hand."""
import json

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
