"""The command line without PyTorch: ``--help`` and ``list`` never import it, and with it missing every
command is still there and says, in one line, which extra to install."""
import json

import pytest

HEAVY = ("torch", "torchvision", "timm", "sklearn", "scipy", "matplotlib")


@pytest.mark.parametrize("args", [["--help"], ["list"], ["list", "miners"], ["train", "--help"], ["serve", "--help"]])
def test_help_and_list_never_import_torch(args, run_python):
    r = run_python(f"""
        import json, sys
        from deepmetric.cli import main
        try:
            code = main({args!r})
        except SystemExit as e:
            code = e.code
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps({{"code": code, "heavy": heavy}}))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"code": 0, "heavy": []}, out


def test_list_names_every_catalogue(run_python):
    from deepmetric.cli import main

    r = run_python("from deepmetric.cli import main; main(['list'])")
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert set(lines) == {"losses", "miners", "backbones", "datasets", "recipes"}
    assert "multi_similarity" in lines["miners"] and "triplet" in lines["losses"] and "small_cnn" in lines["backbones"]
    assert main(["list", "miners"]) == 0


def test_without_torch_every_command_is_there_and_names_the_extra(tmp_path, run_python):
    r = run_python(f"""
        import contextlib, io, json
        from deepmetric.cli import build_parser, main
        commands = sorted(build_parser()._subparsers._group_actions[0].choices)
        runs = {{}}
        for args in (["train", "quickstart"], ["eval", {str(tmp_path)!r}, "--checkpoint", {str(tmp_path)!r}],
                     ["quickstart", "--run-dir", {str(tmp_path / "q")!r}], ["data", "check", "quickstart"],
                     ["export", "--checkpoint", {str(tmp_path)!r}, "--output", {str(tmp_path / "m.onnx")!r}]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(args)
            runs[args[0]] = [code, err.getvalue()]
        print(json.dumps({{"commands": commands, "runs": runs}}))
    """, block_torch=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["commands"] == sorted(["quickstart", "train", "tune", "eval", "data", "list", "embed", "index", "search",
                                      "export", "serve"])
    for command, (code, err) in out["runs"].items():
        assert code == 2, (command, err)
        assert err == f"deepmetric: error: {command} needs torch, which is not installed: " \
                      "pip install 'deepmetric[train]'\n", (command, err)


def test_the_extra_named_brings_the_package():
    import tomllib
    from pathlib import Path

    from deepmetric.cli import EXTRAS

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for package, extra in EXTRAS.items():
        assert any(d.split(">")[0].split("=")[0].split("[")[0] == package for d in deps[extra]), (package, extra)
