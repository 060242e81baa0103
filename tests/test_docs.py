"""The documentation runs: every ```python block of docs/*.md and README.md.

A block is one of:

* runnable (no marker): executed as a script in a fresh process, on CPU, in a
  temporary working directory (so relative paths land in a temporary directory);
* distributed: the line right before it is ``<!-- run: torchrun --nproc_per_node=N -->``;
  it is executed with ``torchrun --standalone`` on N CPU ranks (gloo), same sandbox;
* not runnable: the line right before it is ``<!-- not-run: reason -->`` (it needs a GPU,
  a real checkpoint, a cluster...); it must still be valid Python.

Every public name of ``offload_dist.__all__`` must have a heading in docs/api.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dist_harness import scaled

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
REQUIRED_DOCS = ("design.md", "api.md", "migrating.md", "quickstart.md", "troubleshooting.md")

PYTHON_LANGS = {"python", "py", "python3"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+.-]*)")
MARKER = re.compile(r"^\s*<!--\s*(not-run|run)\s*:(.*?)-->\s*$")
TORCHRUN = re.compile(r"^torchrun\s+--nproc_per_node=(\d+)$")
SNIPPET_TIMEOUT_S = 240  # times OFFLOAD_DIST_TEST_TIME_SCALE (see dist_harness.scaled)

# Launcher state of an outer job must not leak into the snippets.
_OUTER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OFFLOAD_DIST_", "DIST_HARNESS_", "PMI_", "OMPI_")
_OUTER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    kind: str  # "run" | "torchrun" | "not-run"
    detail: str  # the not-run reason, or the torchrun rank count

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _marker_before(lines: list[str], fence: int) -> tuple[int, str, str] | None:
    """``(line index, kind, detail)`` of a marker on the last non-blank line before
    line index ``fence``, if there is one."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    m = MARKER.match(lines[j]) if j >= 0 else None
    return (j, m.group(1), m.group(2).strip()) if m else None


def parse_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The python blocks of one markdown file, and problems with its markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    used_markers: set[int] = set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end >= len(lines):
            problems.append(f"{path.name}:{i + 1}: fence is never closed")
            break
        if lang in PYTHON_LANGS:
            code = "\n".join(lines[i + 1:end]) + "\n"
            marker = _marker_before(lines, i)
            if marker is None:
                blocks.append(Block(path, i + 1, code, "run", ""))
            else:
                j, kind, detail = marker
                used_markers.add(j)
                if kind == "not-run":
                    if not detail:
                        problems.append(f"{path.name}:{j + 1}: not-run marker without a reason")
                    blocks.append(Block(path, i + 1, code, "not-run", detail))
                else:
                    t = TORCHRUN.match(detail)
                    if t is None:
                        problems.append(f"{path.name}:{j + 1}: run marker must read "
                                        f"'run: torchrun --nproc_per_node=N', got {detail!r}")
                    else:
                        blocks.append(Block(path, i + 1, code, "torchrun", t.group(1)))
        i = end + 1
    for j, text in enumerate(lines):
        if MARKER.match(text) and j not in used_markers:
            problems.append(f"{path.name}:{j + 1}: marker is not right before a ```python block")
    return blocks, problems


def all_blocks() -> list[Block]:
    out: list[Block] = []
    for path in DOC_FILES:
        out.extend(parse_blocks(path)[0])
    return out


BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.kind != "not-run"]


def _snippet_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _OUTER_VARS and not k.startswith(_OUTER_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def test_required_docs_exist():
    for name in REQUIRED_DOCS:
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


def test_markers_are_well_formed():
    problems = [p for path in DOC_FILES for p in parse_blocks(path)[1]]
    assert not problems, "\n".join(problems)


def test_blocks_were_found():
    assert len(RUNNABLE) >= 10, [b.id for b in BLOCKS]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "not-run"], ids=lambda b: b.id)
def test_not_run_block_is_valid_python(block: Block):
    compile(block.code, block.id, "exec")


@pytest.mark.timeout(SNIPPET_TIMEOUT_S + 30)
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_block_runs(block: Block, tmp_path: Path):
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    if block.kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={block.detail}", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    try:
        res = subprocess.run(cmd, cwd=tmp_path, env=_snippet_env(), capture_output=True, text=True,
                             timeout=scaled(SNIPPET_TIMEOUT_S))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id}: did not finish in {scaled(SNIPPET_TIMEOUT_S):g} s\n{(e.stdout or '')[-3000:]}"
                    f"\n{(e.stderr or '')[-3000:]}")
    assert res.returncode == 0, (f"{block.id} failed (exit {res.returncode}):\n--- code\n{block.code}"
                                 f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}")


def test_api_reference_covers_every_public_name():
    import offload_dist

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    headings = [ln for ln in api.splitlines() if ln.startswith("#")]
    missing = [name for name in offload_dist.__all__
               if not any(re.search(rf"`{re.escape(name)}[`(\[]", h) for h in headings)]
    assert not missing, f"docs/api.md has no heading for: {missing}"
