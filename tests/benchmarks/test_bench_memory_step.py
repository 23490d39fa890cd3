"""benchmarks/bench_memory_step.py: the three sides step on the same batches; a recipe without a
memory is refused by name."""
import pytest
from benchmark_scripts import load

bms = load("bench_memory_step")
MEMORY = "losses=[{name: multi_similarity, params: {miner_epsilon: 0.1}, memory: {size: 64}}]"
RECIPE = """
data: {format: digits, train_classes: 0.5, val_classes: null, transform: tensor, classes_per_batch: 4,
       samples_per_class: 4, num_workers: 0}
model: {backbone: small_cnn, backbone_options: {width: 4, grid: 1}, in_chans: 1, embedding_dim: 16}
losses: [{name: multi_similarity}]
train: {max_steps: 50}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_times_the_three_sides_with_the_memory_full(recipe, capsys):
    assert bms.main(["--recipe", recipe, "--warm", "3", "--batches", "2", "--rounds", "1", "--threads", "0",
                     MEMORY]) == 0
    out = capsys.readouterr().out
    assert "memory holds" in out and "of 64 after 3 steps" in out
    for side in ("deepmetric, memory", "deepmetric, no memory", "PML MS"):
        assert side in out


def test_a_recipe_without_a_memory_is_refused(recipe):
    with pytest.raises(SystemExit, match="tiny.yaml: its first loss has no memory"):
        bms.main(["--recipe", recipe, "--warm", "0", "--threads", "0"])
