"""benchmarks/bench_cpu_step.py: both parts of a CPU step are timed, plain loop against deepmetric."""
from benchmark_scripts import load

bcs = load("bench_cpu_step")
RECIPE = """
data: {format: digits, train_classes: 0.5, val_classes: null, transform: tensor_augment, classes_per_batch: 4,
       samples_per_class: 4, num_workers: 0}
model: {backbone: small_cnn, backbone_options: {width: 4, grid: 1}, in_chans: 1, embedding_dim: 16}
losses: [{name: multi_similarity}]
"""


def test_times_data_and_model_sides(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    assert bcs.main(["--recipe", str(path), "--rounds", "3", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "batch 16" in out
    assert "| data (load, augment, collate) |" in out and "| model (forward, backward, AdamW) |" in out
    assert "no random affine" not in out, "tensor_augment's affine is warped per batch"


def test_a_recipe_without_an_affine_says_so(tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text(RECIPE.replace("tensor_augment", "tensor"))
    assert bcs.main(["--recipe", str(path), "--rounds", "2", "--threads", "0"]) == 0
    assert "no random affine to warp per batch" in capsys.readouterr().out
