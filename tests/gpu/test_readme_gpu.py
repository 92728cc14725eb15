"""The README's quickstart, run exactly as written (``pytest -m gpu``)."""

from __future__ import annotations

import os
import re

from tests.helpers import ROOT, explain, run_if, run_script


def quickstart_code() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quickstart_is_a_complete_script():
    code = quickstart_code()
    compile(code, "README quickstart", "exec")  # syntax, on every host
    assert "TRTRuntimeSettings" in code and "trainer.predict" in code


@run_if(min_cuda_gpus=1, rtx=True)
def test_readme_quickstart_runs_as_written_and_the_second_run_is_warm(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_code())
    proc = run_script(str(script), env={"LIGHTNING_TRT_RTX_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, explain(proc)
    print("\n" + proc.stdout + proc.stderr[-3000:])
    rows = [line.split() for line in proc.stderr.splitlines() if re.match(r"^0\s+\w+\s+1\s", line)]
    assert [row[3] for row in rows] == ["cold", "warm"], proc.stderr[-3000:]
