"""Nothing read from a file or a peer can run code; nothing written is open to other users.

* The package never unpickles: a scan of ``offload_dist/`` for pickle, ``torch.load``/
  ``torch.save``, ``eval``/``exec`` and torch's object collectives (which pickle), and a
  distributed load + forward + replace + save with the pickle entry points recording
  every call. The one dynamic import (a tensor subclass named by import path in the
  layouts ranks exchange) accepts only subclasses of ``torch.Tensor``/``enum.Enum``.
* Metadata between ranks is JSON: a value that is not plain data raises
  ``CollectiveError`` on every rank (``all_gather_json`` is covered by
  ``tests/test_init.py::test_json_collectives``; ``broadcast_json`` here).
* Offload folders are created 0700 and offload files 0600, temporary files included,
  even with ``umask 000``; ``save_parallel`` never leaves a world-writable file.
"""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

PACKAGE = Path(__file__).resolve().parent.parent / "offload_dist"

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {
    ("torch", "load"), ("torch", "save"),
    # torch.distributed's object collectives pickle what they send and unpickle what they receive.
    ("*", "all_gather_object"), ("*", "broadcast_object_list"), ("*", "gather_object"),
    ("*", "scatter_object_list"), ("*", "send_object_list"), ("*", "recv_object_list"),
}
# Documented exceptions: (file, what) -> why it is safe. See docs/reliability.md, Security.
ALLOWED = {
    ("offload_dist/distributed/parallel.py", "importlib.import_module"):
        "tensor-subclass and enum classes named by import path in the layouts ranks exchange; "
        "only subclasses of torch.Tensor / enum.Enum are accepted (trusted group: importing runs module code)",
}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _findings(path: Path, root: Path = PACKAGE.parent) -> list[tuple[str, int, str]]:
    rel = str(path.relative_to(root))
    tree = ast.parse(path.read_text(), filename=rel)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(rel, node.lineno, f"import {a.name}") for a in node.names
                      if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append((rel, node.lineno, f"from {node.module} import"))
            if node.module in ("torch", "torch.distributed", "torch.distributed.distributed_c10d"):
                found += [(rel, node.lineno, f"from {node.module} import {a.name}") for a in node.names
                          if ("torch", a.name) in FORBIDDEN_ATTRIBUTES or ("*", a.name) in FORBIDDEN_ATTRIBUTES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            found.append((rel, node.lineno, f"{node.func.id}()"))
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node) or ""
            if ("*", node.attr) in FORBIDDEN_ATTRIBUTES or dotted in {"torch.load", "torch.save"}:
                found.append((rel, node.lineno, dotted or node.attr))
            if dotted == "importlib.import_module" and (rel, dotted) not in ALLOWED:
                found.append((rel, node.lineno, dotted))
        elif isinstance(node, ast.keyword) and node.arg == "weights_only":
            found.append((rel, node.lineno, "weights_only="))
    return found


def test_no_unpickling_or_code_execution_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"the scan found only {len(files)} files under {PACKAGE}"
    found = [f for path in files for f in _findings(path)]
    assert found == [], "\n".join(f"{f}:{line}: {what}" for f, line, what in found)


def test_the_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "offload_dist" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import pickle\nimport torch\nimport torch.distributed as dist\n"
                   "x = torch.load('f', weights_only=False)\neval('1')\n"
                   "dist.all_gather_object([], 1)\nfrom torch.distributed import broadcast_object_list\n")
    kinds = {what for _, _, what in _findings(bad, tmp_path)}
    assert kinds == {"import pickle", "torch.load", "weights_only=", "eval()", "dist.all_gather_object",
                     "from torch.distributed import broadcast_object_list"}, kinds


def test_peer_layouts_cannot_name_arbitrary_classes():
    """A layout from another rank names a class by import path: anything that is not a
    tensor subclass (or an enum, for flatten contexts) is refused, not instantiated."""
    from offload_dist.distributed.parallel import _import, layout_from_json

    with pytest.raises(TypeError, match="not a subclass of Tensor"):
        _import("subprocess:Popen", torch.Tensor)
    with pytest.raises(TypeError, match="not a subclass of Tensor"):
        _import("os:system", torch.Tensor)
    bad = {"layout": {"cls": "subprocess:Popen", "ctx": None, "inner": [], "shape": [1], "stride": [1]},
           "rg": False, "param": None}
    with pytest.raises(TypeError, match="subprocess:Popen"):
        layout_from_json(bad)
    bad = {"layout": {"s": 0, "dtype": "float32", "shape": [1], "stride": [1], "offset": 0}, "rg": False,
           "param": "builtins:eval"}
    with pytest.raises(TypeError, match="builtins:eval"):
        layout_from_json(bad)


# ------------------------------------------------------------------------ file permissions


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_offload_folder_and_files_are_private_single_process(tmp_path, monkeypatch, open_umask):
    import offload_dist as od
    import offload_dist.tiers.disk as disk_mod

    seen_while_writing = []
    real_write = disk_mod._write_all

    def write_all(fd, data):
        seen_while_writing.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_write(fd, data)

    monkeypatch.setattr(disk_mod, "_write_all", write_all)
    folder = tmp_path / "offload"
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    od.offload_model(model, "cpu", "disk", offload_folder=str(folder))
    files = sorted(folder.iterdir())
    assert len(files) == 2 and seen_while_writing
    assert _mode(folder) == 0o700, oct(_mode(folder))
    assert {oct(_mode(f)) for f in files} == {oct(0o600)}
    assert set(seen_while_writing) == {0o600}, f"temporary files were created {set(map(oct, seen_while_writing))}"
    od.update_offload_parameter(model[0], "weight", torch.zeros(8, 8))  # a rewrite: a new file
    assert {oct(_mode(f)) for f in folder.iterdir()} == {oct(0o600)}


def _rank_permissions_and_json(rank: int, ckpt: str, root: str) -> dict:
    import pickle

    import torch.distributed.distributed_c10d as c10d

    import offload_dist as od
    from offload_dist.distributed import collectives
    from offload_dist.distributed.plan import PlanPolicy
    from offload_dist.policy import Tier

    os.umask(0)
    od.init_dist()
    res: dict = {}
    # Every pickle entry point records its callers while the library works.
    calls: list[str] = []
    real = {name: getattr(pickle, name) for name in ("loads", "load", "dumps", "dump", "Unpickler", "Pickler")}

    def recorder(name):
        def record(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return record

    for name in real:
        setattr(pickle, name, recorder(name))
    real_c10d = c10d._pickler, c10d._unpickler  # what torch's object collectives use
    c10d._pickler, c10d._unpickler = recorder("Pickler"), recorder("Unpickler")
    try:
        folder = os.path.join(root, "nested", f"offload-{rank}")
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        od.load_distributed(model, ckpt, mode="rank0", plan_policy=PlanPolicy(tier=Tier.DISK), offload_folder=folder,
                            progress=False)
        with torch.no_grad():
            model(torch.ones(2, 16))
        od.replace_module_parallel(model, lambda m: m.register_buffer("scale", torch.ones(1)))
        out = os.path.join(root, "saved")
        od.save_parallel(model, out)
        res["pickle_calls"] = list(calls)
        gathered: list = [None, None]
        torch.distributed.all_gather_object(gathered, rank)  # the recorder sees an object collective
        res["recorder_works"] = len(calls) > len(res["pickle_calls"])
    finally:
        for name, fn in real.items():
            setattr(pickle, name, fn)
        c10d._pickler, c10d._unpickler = real_c10d
    res["folder_mode"] = _mode(folder)
    res["file_modes"] = sorted({_mode(os.path.join(folder, f)) for f in os.listdir(folder)})
    res["n_files"] = len(os.listdir(folder))
    od.barrier()
    res["saved_modes"] = {f: _mode(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    # A value that is not plain data, sent by rank 1 only: every rank raises, none hangs.
    try:
        collectives.broadcast_json({"payload": object()} if rank == 1 else None, src=1, tag="test")
        res["bad_broadcast"] = "no error"
    except collectives.CollectiveError as e:
        res["bad_broadcast"] = str(e)
    res["still_in_step"] = collectives.all_gather_json(rank)
    return res


def test_distributed_files_are_private_and_metadata_is_json(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ckpt = tmp_path / "model.safetensors"
    save_file(nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)]).state_dict(), str(ckpt))
    results = run_ranks(_rank_permissions_and_json, 2, tmp_path, args=(str(ckpt), str(tmp_path / "job")), timeout=120)
    for r, res in enumerate(results):
        assert res["recorder_works"] and res["pickle_calls"] == [], f"rank {r} pickled: {res['pickle_calls']}"
        assert res["folder_mode"] == 0o700, f"rank {r}: offload folder {oct(res['folder_mode'])}"
        assert res["n_files"] > 0 and res["file_modes"] == [0o600], f"rank {r}: {list(map(oct, res['file_modes']))}"
        saved = res["saved_modes"]
        assert any(f.endswith(".safetensors") for f in saved) and "model.safetensors.index.json" in saved, saved
        writable = {f: oct(m) for f, m in saved.items() if m & 0o002}
        assert writable == {}, f"save_parallel left world-writable files under umask 000: {writable}"
        msg = res["bad_broadcast"]
        assert "[rank 1] broadcast_json: value is not plain JSON data" in msg, f"rank {r}: {msg}"
        assert res["still_in_step"] == [0, 1]
