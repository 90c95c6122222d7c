"""No code path of ours may unpickle (or eval) what a peer sends."""

from pathlib import Path

import pytest

from serve.nopickle import check_paths, check_source

ROOT = Path(__file__).resolve().parents[2]


def test_the_project_has_no_pickle_like_calls() -> None:
    findings = check_paths([ROOT / "serve", ROOT / "clients", ROOT / "loadtests"])
    assert findings == []


@pytest.mark.parametrize(
    "planted",
    [
        "import pickle\n",
        "from cloudpickle import loads\n",
        "import torch\nx = torch.load(path)\n",
        "import torch\nx = torch.load(path, weights_only=False)\n",
        "import torch.distributed as dist\ndist.broadcast_object_list(objs)\n",
        "dist.all_gather_object(out, obj)\n",
        "sock.recv_pyobj()\n",
        "eval(text)\n",
        "exec(code)\n",
        "import numpy as np\nnp.load(f, allow_pickle=True)\n",
        # spelled through the imports
        "import torch as th\nx = th.load(path)\n",
        "from torch import load\nx = load(path)\n",
        "from torch import load as tl\nx = tl(path, weights_only=flag)\n",
        "import torch\nx = torch.serialization.load(path)\n",
        "import numpy as xp\nxp.load(f, allow_pickle=True)\n",
        "import builtins\nbuiltins.eval(text)\n",
        "from builtins import exec as run\nrun(code)\n",
        "mod = __import__('pickle')\n",
        "import importlib\nmod = importlib.import_module('cloudpickle')\n",
        "import jsonpickle\n",
        "import pandas as pd\ndf = pd.read_pickle(path)\n",
        "import yaml\nyaml.load(text)\n",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)\n",
        "import yaml\nyaml.unsafe_load(text)\n",
    ],
)
def test_planted_examples_are_found(planted: str) -> None:
    assert len(check_source(planted, "planted.py")) == 1


def test_safe_lookalikes_pass() -> None:
    safe = (
        "import torch\n"
        "model.eval()\n"
        "x = torch.load(path, weights_only=True)\n"
        "loader.exec_module(mod)\n"
        "np.load(f)\n"
        "import importlib\nimportlib.import_module('serve.bench.serve')\n"
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)\nyaml.safe_load(text)\n"
        "from torch import load\nload(path, weights_only=True)\n"
    )
    assert check_source(safe, "safe.py") == []


def test_planted_file_fails_the_command(tmp_path: Path) -> None:
    from serve.nopickle import main

    (tmp_path / "bad.py").write_text("import pickle\npickle.loads(b'')\n")
    (tmp_path / "good.py").write_text("x = 1\n")
    assert main([str(tmp_path)]) == 1
    (tmp_path / "bad.py").unlink()
    assert main([str(tmp_path)]) == 0
