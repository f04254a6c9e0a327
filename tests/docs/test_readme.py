"""The README's Python blocks run, and every relative link in README.md and docs/*.md resolves.

The blocks run in order, in one namespace, in a fresh interpreter on the CPU: a fresh process sees
no thread setting, backend variable or import state left by other tests, and exactly what a user
who pastes the README into Python sees.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# Every linked file must exist: no allow-list.
NOT_YET_CREATED: set = set()

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")

# Runs in the child: exec every block of the README in one namespace; name the block that fails.
_RUNNER = r"""
import re, sys, traceback
text = open(sys.argv[1], encoding="utf-8").read()
blocks = re.findall(sys.argv[2], text, re.S | re.M)
ns = {"__name__": "__readme__"}
for i, code in enumerate(blocks, 1):
    try:
        exec(compile(code, f"README.md python block {i}", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"README.md python block {i} of {len(blocks)} raised", file=sys.stderr)
        sys.exit(1)
print(f"ran {len(blocks)} blocks")
"""


def python_blocks(text: str):
    return _BLOCK.findall(text)


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 1


def test_readme_python_blocks_run(tmp_path):
    env = dict(os.environ)
    # the child imports resnet_bk from where this process does (installed or from the tree); it
    # runs in an empty folder, so its working directory shadows nothing
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the README promises a CPU-only run
    for name in ("RESNET_BK_BACKEND", "RESNET_BK_VERIFY"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(README), _BLOCK.pattern],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def _markdown_files():
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def _relative_links(path: Path):
    text = path.read_text(encoding="utf-8")
    # links inside fenced code blocks are code, not links
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        yield target


def test_relative_links_resolve():
    broken = []
    for md in _markdown_files():
        for target in _relative_links(md):
            rel = target.split("#", 1)[0]
            if not rel:
                continue
            resolved = (md.parent / rel).resolve()
            try:
                key = resolved.relative_to(ROOT).as_posix()
            except ValueError:
                broken.append(f"{md.relative_to(ROOT)}: {target} (outside the repository)")
                continue
            if not resolved.exists() and key not in NOT_YET_CREATED:
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
