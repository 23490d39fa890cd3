"""faiss.contrib.torch_utils (imported by pytorch-metric-learning) drops ``params`` from every index's
search; :func:`deepmetric.inference.faiss_compat.search_with_params` gives it back for NumPy queries, and
torch queries still go to torch_utils' search."""
import subprocess
import sys
import textwrap


def test_params_search_is_back_after_torch_utils():
    code = textwrap.dedent("""
        import faiss, numpy as np, torch
        import faiss.contrib.torch_utils
        from deepmetric.inference.faiss_compat import search_with_params
        x = np.random.RandomState(0).randn(200, 8).astype("float32")
        index = faiss.IndexHNSWFlat(8, 16)
        index.add(x)
        params = faiss.SearchParametersHNSW(efSearch=64)
        try:
            index.search(x[:3], 5, params=params)
            raise SystemExit("torch_utils took params: nothing to mend")
        except TypeError:
            pass
        search_with_params()
        search_with_params()  # idempotent
        d, i = index.search(x[:3], 5, params=params)
        assert (i[:, 0] == np.arange(3)).all(), i
        dt, it = index.search(torch.from_numpy(x[:3]), 5)  # torch in, torch out, as torch_utils does
        assert isinstance(it, torch.Tensor) and (it.numpy() == i).all()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-2000:]
