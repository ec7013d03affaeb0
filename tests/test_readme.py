"""README.md runs as written: its ```python blocks, top to bottom, in one fresh interpreter (CPU, small
sizes, no network).  Blocks fenced as ```python no-run (e.g. ``from_pretrained`` of a hub model) are
shown, not run.  Also: the "Two commands" section holds exactly two commands."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def _blocks():
    """(info string, code, line number) of every fenced block of README.md."""
    text = open(README, encoding="utf-8").read()
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def _python_blocks():
    return [(code, line) for info, code, line in _blocks() if info.split()[:1] == ["python"] and "no-run" not in info]


def test_readme_has_python_blocks_and_marks_the_others():
    blocks = _blocks()
    runnable = _python_blocks()
    assert len(runnable) >= 3, "README.md lost its usage examples"
    for info, code, line in blocks:
        words = info.split()
        if words[:1] == ["python"]:
            assert set(words[1:]) <= {"no-run"}, f"README.md:{line}: unknown fence option {info!r}"
        if "from_pretrained(" in code:
            assert "no-run" in words, f"README.md:{line}: a from_pretrained block must be fenced as ```python no-run"


def test_readme_python_blocks_run(tmp_path):
    """Concatenated in order, as a user pastes them; a failure names the README line."""
    pytest.importorskip("transformers")
    parts = []
    for code, line in _python_blocks():
        parts.append(f"# --- README.md line {line}\n__readme_line__ = {line}\n{code}")
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(parts))
    # as a user runs them: no TRITON_INTERPRET (tests/conftest.py sets it for the kernel tests), no hub access
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                         timeout=600)
    if res.returncode != 0:
        tb_lines = [int(n) for n in re.findall(rf'File "{re.escape(str(script))}", line (\d+)', res.stderr)]
        where = ""
        if tb_lines:
            src = script.read_text().splitlines()
            marks = [i for i, l in enumerate(src[: tb_lines[-1]]) if l.startswith("__readme_line__ = ")]
            if marks:
                start = int(src[marks[-1]].split("=")[1])
                where = f" (README.md block starting at line {start})"
        pytest.fail(f"README code failed{where}:\n{res.stderr[-3000:]}")
    assert "torch" in res.stdout  # deberta_fast.last_backend() on a CPU machine


def test_two_commands():
    text = open(README, encoding="utf-8").read()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = FENCE.search(section)
    assert block and block.group(1).strip() == "bash"
    commands = [l.split("#", 1)[0].strip() for l in block.group(2).splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) == 2, commands
    assert "python -m deberta_fast" in commands[0] and "pip install -e" in commands[0]
    assert commands[1] == "bash .ci/test"
    assert ".ci/run" in section  # says that .ci/run adds the slower checks
