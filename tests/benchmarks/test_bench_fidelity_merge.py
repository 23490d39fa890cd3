"""benchmarks/bench_fidelity.py --merge: tables of seeds run in separate processes, put together
without double counting, mixing budgets or choosing a recipe on fewer seeds than the others."""
import json

import pytest
from benchmark_scripts import load

bf = load("bench_fidelity")


def run(seed, val, test):
    return {"seed": seed, "val": {"map@r": val}, "test": {"map@r": test, "recall@1": test + 0.3},
            "images": 600, "train_s": 2.0, "step": 600}


MS = [{"name": "multi_similarity", "params": {"miner_epsilon": 0.1}}]


def report(path, runs, budget=(), variants=None, losses=MS):
    path.write_text(json.dumps({"datasets": {"cjk_glyphs": {
        "budget": list(budget), "recipe_overrides": [], "recipe_losses": losses, "variants": variants or {},
        "runs": runs}}}))
    return str(path)


def test_merge_puts_seeds_together_and_chooses_on_the_validation_mean(tmp_path, capsys):
    xbm = {"deepmetric_xbm": ["losses=[{name: multi_similarity, memory: {size: 4096}}]"]}
    a = report(tmp_path / "a.json", {"untrained": [run(0, 0.1, 0.04), run(1, 0.1, 0.05)],
                                     "deepmetric": [run(0, 0.86, 0.61), run(1, 0.86, 0.63)],
                                     "deepmetric_xbm": [run(0, 0.87, 0.62), run(1, 0.85, 0.60)]}, variants=xbm)
    b = report(tmp_path / "b.json", {"untrained": [run(2, 0.1, 0.06)], "deepmetric": [run(2, 0.84, 0.62)],
                                     "deepmetric_xbm": [run(2, 0.88, 0.64)]}, variants=xbm)
    # the untrained network of seed 0 again (a file of another system's runs) is dropped, not counted twice
    # (and a file without deepmetric's runs may come from a time the recipe file said something else)
    c = report(tmp_path / "c.json", {"untrained": [run(0, 0.1, 0.04)], "pml_ms": [run(0, 0.85, 0.6)]}, losses=None)
    rows = bf.merge_reports([a, b, c])["cjk_glyphs"]
    assert [r["seed"] for r in rows["untrained"]] == [0, 1, 2]
    assert [r["seed"] for r in rows["deepmetric_xbm"]] == [0, 1, 2]
    chosen, means = bf.choose_on_validation(rows, ["deepmetric", "deepmetric_xbm"], "map@r")
    assert chosen == "deepmetric_xbm" and means["deepmetric"] == pytest.approx(0.8533, abs=1e-4)
    assert bf.main(["--merge", a, b, c]) == 0
    out = capsys.readouterr().out
    assert "chosen on validation: deepmetric_xbm" in out and "pml_ms" in out


def test_a_candidate_on_fewer_seeds_does_not_compete(tmp_path):
    rows = {"deepmetric": [run(0, 0.86, 0.6), run(1, 0.86, 0.6)], "deepmetric_lucky": [run(0, 0.99, 0.7)]}
    chosen, means = bf.choose_on_validation(rows, ["deepmetric", "deepmetric_lucky"], "map@r")
    assert chosen == "deepmetric" and set(means) == {"deepmetric"}


@pytest.mark.parametrize("clash", ["budget", "variant", "seed", "recipe"])
def test_merge_refuses_what_would_mix_two_things_under_one_name(tmp_path, clash):
    a = report(tmp_path / "a.json", {"deepmetric": [run(0, 0.86, 0.6)]}, variants={"deepmetric_x": ["a=1"]})
    if clash == "budget":
        b = report(tmp_path / "b.json", {"deepmetric": [run(1, 0.86, 0.6)]}, budget=["train.max_steps=5"])
    elif clash == "variant":
        b = report(tmp_path / "b.json", {"deepmetric": [run(1, 0.86, 0.6)]}, variants={"deepmetric_x": ["a=2"]})
    elif clash == "recipe":  # the recipe file was edited between the two runs
        b = report(tmp_path / "b.json", {"deepmetric": [run(1, 0.86, 0.6)]}, losses=[{"name": "triplet"}])
    else:
        b = report(tmp_path / "b.json", {"deepmetric": [run(0, 0.86, 0.6)]})
    with pytest.raises(SystemExit, match="b.json"):
        bf.merge_reports([a, b])


def test_merge_names_a_file_that_is_not_a_report(tmp_path):
    bad = tmp_path / "log.txt"
    bad.write_text("[cjk_glyphs seed 0] deepmetric test map@r 0.61")
    with pytest.raises(SystemExit, match="log.txt: not a report"):
        bf.merge_reports([str(bad)])


def test_rotated_validation_folds_cover_every_training_class_equally():
    folds = [bf.validation_fold([0, 1, 2, 3, 4], 0.4, k) for k in range(5)]
    assert folds == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]
    assert all(sum(c in f for f in folds) == 2 for c in range(5))
    cfg = bf.recipe("fashion_mnist", 3, [bf.ROTATE], [], None)
    assert cfg.seed == 3 and cfg.data.val_classes == [1, 2]
    assert bf.recipe("fashion_mnist", 3, [], [], None).data.val_classes == 0.4, "without the flag: one split"
    with pytest.raises(SystemExit, match="--rotate-validation needs cjk_glyphs.yaml to list data.train_classes"):
        bf.recipe("cjk_glyphs", 0, [bf.ROTATE], [], "/nowhere")


def test_merge_keeps_rotated_and_fixed_validation_apart(tmp_path):
    a = report(tmp_path / "a.json", {"deepmetric": [run(0, 0.86, 0.61)]})
    b = report(tmp_path / "b.json", {"deepmetric": [run(1, 0.86, 0.61)]}, budget=[bf.ROTATE])
    with pytest.raises(SystemExit, match="another budget"):
        bf.merge_reports([a, b])
